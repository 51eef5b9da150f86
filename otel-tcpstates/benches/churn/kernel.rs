//! The kernel's view: BPF program statistics, process CPU and memory.
use super::*;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ProgStats {
    pub(crate) run_time_ns: u64,
    pub(crate) run_cnt: u64,
}

pub(crate) struct Prog {
    pub(crate) id: u64,
    pub(crate) name: String,
    /// bpftool's program type, e.g. `tracepoint`, `cgroup_skb`.
    pub(crate) kind: String,
    /// The maps it uses: tells one loader's programs from another's.
    pub(crate) maps: HashSet<u64>,
    pub(crate) stats: ProgStats,
}

pub(crate) fn bpftool_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("timeout")
        .args(["10", "bpftool", "-j"])
        .args(args)
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub(crate) fn prog(v: &serde_json::Value) -> Prog {
    let num = |key| v[key].as_u64().unwrap_or(0);
    Prog {
        id: num("id"),
        name: v["name"].as_str().unwrap_or("").to_owned(),
        kind: v["type"].as_str().unwrap_or("").to_owned(),
        maps: v["map_ids"]
            .as_array()
            .map(|ids| ids.iter().filter_map(|id| id.as_u64()).collect())
            .unwrap_or_default(),
        // Both are absent until the program has run with statistics on.
        stats: ProgStats {
            run_time_ns: num("run_time_ns"),
            run_cnt: num("run_cnt"),
        },
    }
}

/// Every BPF program loaded now.
pub(crate) fn progs() -> Result<Vec<Prog>> {
    let all = bpftool_json(&["prog", "show"])?;
    Ok(all
        .as_array()
        .map(|progs| progs.iter().map(prog).collect())
        .unwrap_or_default())
}

pub(crate) fn tracepoint_progs() -> Result<Vec<Prog>> {
    Ok(progs()?
        .into_iter()
        .filter(|p| p.kind == "tracepoint")
        .collect())
}

pub(crate) fn prog_stats(id: u64) -> Result<ProgStats> {
    Ok(prog(&bpftool_json(&["prog", "show", "id", &id.to_string()])?).stats)
}

/// A sysctl set for as long as the guard lives, then restored.
pub(crate) struct Sysctl {
    pub(crate) path: String,
    pub(crate) old: String,
}

impl Sysctl {
    pub(crate) fn set(name: &str, value: &str) -> Result<Sysctl> {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        let old = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        fs::write(&path, value).with_context(|| format!("writing {path}"))?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(err) = fs::write(&self.path, self.old.trim()) {
            eprintln!("could not restore {}: {err}", self.path);
        }
    }
}

/// User and system CPU seconds of a process ("self" or a pid), all its threads.
pub(crate) fn cpu_seconds(pid: &str) -> Result<(f64, f64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces;
    // utime and stime are fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok((ticks(fields[11])?, ticks(fields[12])?))
}

/// User CPU seconds of the whole machine (all CPUs, nice included).
pub(crate) fn machine_user_seconds() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<&str> = cpu.split_whitespace().collect();
    Ok(ticks(fields[1])? + ticks(fields[2])?)
}

pub(crate) fn ticks(field: &str) -> Result<f64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(field.parse::<u64>()? as f64 / per_second as f64)
}

/// A `Vm*` line of /proc/PID/status, in MiB.
pub(crate) fn vm_mib(pid: u32, key: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    let kib: f64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}
