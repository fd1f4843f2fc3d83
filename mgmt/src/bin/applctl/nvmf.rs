//! `applctl nvmf ...`: NVMe/TCP exports.

use clap::Subcommand;
use mgmt::pb;

use super::show::table;
use super::{out, Client, Failure};

#[derive(Subcommand)]
pub enum NvmfCmd {
    /// Export a volume over NVMe/TCP as a subsystem (namespace 1).
    ///
    /// Example: applctl nvmf create nqn.2026-12.io.example:vol0 --volume vol0
    /// --listen 0.0.0.0:4420 --host nqn.2014-08.org.nvmexpress:uuid:...
    Create {
        /// The subsystem's NQN.
        nqn: String,
        /// The volume.
        #[arg(long)]
        volume: String,
        /// IP:PORT to listen on (NVMe/TCP's port is 4420).
        #[arg(long, default_value = "0.0.0.0:4420")]
        listen: String,
        /// A host NQN allowed to connect (repeat for more).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Any host may connect.
        #[arg(long)]
        allow_any_host: bool,
        /// Serial number hosts see (default: the volume's name).
        #[arg(long, default_value = "")]
        serial: String,
        /// The namespace's NGUID, 32 hex digits (default: made now, kept).
        #[arg(long, default_value = "")]
        nguid: String,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
    },
    /// List NVMe/TCP exports and the hosts connected.
    List,
    /// Stop exporting a subsystem (its hosts' connections close).
    Delete {
        /// The subsystem's NQN.
        nqn: String,
    },
}

fn show(es: &[pb::NvmfExport]) -> String {
    table(
        &[
            "NQN",
            "VOLUME",
            "LISTEN",
            "RO",
            "HOSTS",
            "CONNECTIONS",
            "CONTROLLERS",
        ],
        es.iter()
            .map(|e| {
                vec![
                    e.nqn.clone(),
                    e.volume.clone(),
                    e.listen.clone(),
                    if e.read_only { "yes" } else { "no" }.into(),
                    if e.allow_any_host {
                        "any".into()
                    } else {
                        e.hosts.join(",")
                    },
                    if e.volume_unavailable {
                        "- (volume did not start)".into()
                    } else if !e.not_served.is_empty() {
                        "- (not made yet: see health)".into()
                    } else {
                        e.connections.to_string()
                    },
                    e.controllers
                        .iter()
                        .map(|c| format!("{}:{}", c.cntlid, c.host_nqn))
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            })
            .collect(),
    )
}

pub async fn nvmf(c: &mut Client, json: bool, cmd: NvmfCmd) -> Result<(), Failure> {
    match cmd {
        NvmfCmd::Create {
            nqn,
            volume,
            listen,
            hosts,
            allow_any_host,
            serial,
            nguid,
            read_only,
        } => {
            let e = c
                .create_nvmf_export(pb::CreateNvmfExportRequest {
                    nqn,
                    volume,
                    listen,
                    hosts,
                    allow_any_host,
                    serial,
                    nguid,
                    read_only,
                })
                .await?
                .into_inner();
            out(json, &e, || show(std::slice::from_ref(&e)))
        }
        NvmfCmd::List => {
            let l = c
                .list_nvmf_exports(pb::ListNvmfExportsRequest {})
                .await?
                .into_inner();
            out(json, &l, || show(&l.exports))
        }
        NvmfCmd::Delete { nqn } => {
            c.delete_nvmf_export(pb::DeleteNvmfExportRequest { nqn: nqn.clone() })
                .await?;
            out(json, &serde_json::json!({"deleted": nqn}), || {
                format!("deleted {nqn}\n")
            })
        }
    }
}
