//! NVMe/TCP exports between the API's messages and the manager's types.

use mgmt::pb;

use crate::config::NvmfExportDecl;
use crate::manager::NvmfExportView;

/// The declaration a create request asks for.
pub fn decl(r: pb::CreateNvmfExportRequest) -> NvmfExportDecl {
    NvmfExportDecl {
        nqn: r.nqn,
        volume: r.volume,
        listen: r.listen,
        hosts: r.hosts,
        allow_any_host: r.allow_any_host,
        serial: r.serial,
        nguid: r.nguid,
        read_only: r.read_only,
    }
}

/// An export as the API shows it.
pub fn to_pb(v: NvmfExportView) -> pb::NvmfExport {
    pb::NvmfExport {
        nqn: v.decl.nqn,
        volume: v.decl.volume,
        listen: v.decl.listen,
        hosts: v.decl.hosts,
        allow_any_host: v.decl.allow_any_host,
        serial: v.decl.serial,
        nguid: v.decl.nguid,
        read_only: v.decl.read_only,
        connections: v.connections,
        controllers: v
            .controllers
            .into_iter()
            .map(|(cntlid, host_nqn)| pb::NvmfController {
                cntlid: cntlid as u32,
                host_nqn,
            })
            .collect(),
        volume_unavailable: false,
        not_served: String::new(),
    }
}
