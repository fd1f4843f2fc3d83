//! A process's CPU time and page faults from /proc, for the benchmark
//! clients' per-IO figures.

/// The backend's CPU ticks (user + system) and minor page faults so far.
pub fn cpu_ticks(pid: i32) -> Result<(u64, u64), String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let after = s.rfind(')').map(|i| &s[i + 2..]).ok_or("bad stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let p = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("bad stat field")
    };
    Ok((p(11)? + p(12)?, p(7)?))
}
