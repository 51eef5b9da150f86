//! The container a process runs in, from its cgroup paths (`/proc/PID/cgroup`), as
//! the 64-hex-digit id Docker, containerd, CRI-O and Podman give their containers.
use std::{fs, num::NonZeroUsize};

use lru::LruCache;

/// Remembers answers per (pid, cgroup id): reading /proc once per process, not per
/// socket, and still right when a pid is reused in another cgroup.
pub struct ContainerResolver {
    cache: LruCache<(u32, u64), Option<String>>,
    proc_root: String,
}

impl ContainerResolver {
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    fn with_proc_root(proc_root: &str) -> Self {
        Self {
            cache: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
            proc_root: proc_root.to_owned(),
        }
    }

    /// The container id of `pid` (in cgroup `cgroup_id`), if it runs in one. Call it
    /// while the process lives; later calls are answered from the cache.
    pub fn resolve(&mut self, pid: u32, cgroup_id: u64) -> Option<String> {
        if pid == 0 {
            return None;
        }
        if let Some(known) = self.cache.get(&(pid, cgroup_id)) {
            return known.clone();
        }
        let id = fs::read_to_string(format!("{}/{pid}/cgroup", self.proc_root))
            .ok()
            .and_then(|text| container_id(&text));
        self.cache.put((pid, cgroup_id), id.clone());
        id
    }

    /// The cached answer, without reading /proc.
    pub fn cached(&self, pid: u32, cgroup_id: u64) -> Option<String> {
        self.cache.peek(&(pid, cgroup_id)).cloned().flatten()
    }
}

/// Finds a container id in the contents of a `/proc/PID/cgroup` file (cgroup v1
/// and v2 lines alike), innermost path segment first.
pub fn container_id(cgroup_file: &str) -> Option<String> {
    cgroup_file
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.rsplit('/'))
        .find_map(segment_id)
}

fn segment_id(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    // CRI-O's monitor process lives in its own scope, not the container's.
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = [
        "docker-",
        "cri-containerd-",
        "crio-",
        "libpod-",
        "containerd-",
    ]
    .iter()
    .find_map(|prefix| name.strip_prefix(prefix))
    .unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e1c9a7b2d5e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071";

    #[test]
    fn finds_ids_in_the_usual_layouts() {
        for file in [
            format!("0::/system.slice/docker-{ID}.scope\n"),
            format!("12:memory:/docker/{ID}\n0::/\n"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{ID}.scope\n"
            ),
            format!("0::/kubepods/besteffort/pod7c1e/{ID}\n"),
            format!("0::/machine.slice/libpod-{ID}.scope/container\n"),
            format!("0::/kubepods.slice/crio-{ID}.scope\n"),
        ] {
            assert_eq!(container_id(&file).as_deref(), Some(ID), "{file}");
        }
    }

    #[test]
    fn no_container_no_id() {
        for file in [
            "0::/\n",
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            "4:memory:/process_api/c8f1c04f127ee9a622be166a47fa1313\n",
            &format!("0::/system.slice/crio-conmon-{ID}.scope\n"),
            "garbage",
            "",
        ] {
            assert_eq!(container_id(file), None, "{file}");
        }
    }

    #[test]
    fn resolves_once_per_process_and_cgroup() {
        let dir = std::env::temp_dir().join(format!("otel-tcpstates-proc-{}", std::process::id()));
        fs::create_dir_all(dir.join("42")).unwrap();
        fs::write(
            dir.join("42/cgroup"),
            format!("0::/system.slice/docker-{ID}.scope\n"),
        )
        .unwrap();
        let mut resolver = ContainerResolver::with_proc_root(dir.to_str().unwrap());
        assert_eq!(resolver.resolve(42, 7).as_deref(), Some(ID));
        fs::remove_dir_all(&dir).unwrap();
        // The process is gone: the answer comes from the cache.
        assert_eq!(resolver.resolve(42, 7).as_deref(), Some(ID));
        assert_eq!(resolver.cached(42, 7).as_deref(), Some(ID));
        assert_eq!(
            resolver.resolve(42, 8),
            None,
            "another cgroup is looked up afresh"
        );
        assert_eq!(resolver.resolve(0, 7), None);
    }
}
