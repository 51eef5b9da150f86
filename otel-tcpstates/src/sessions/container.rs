//! The container a process runs in, as the 64-hex-digit id Docker, containerd,
//! CRI-O and Podman give their containers: from the path of its cgroup v2 (found by
//! the cgroup id the kernel reports, so it works after the process exited), else from
//! `/proc/PID/cgroup` (cgroup v1 hierarchies).
use std::{
    collections::HashMap,
    fs,
    num::NonZeroUsize,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lru::LruCache;

use crate::kernel::cgroup;

/// Unknown cgroup ids trigger a new scan of the cgroup tree at most this often.
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// Bounds on a scan, for hosts with very large cgroup trees.
const SCAN_MAX_DIRS: usize = 200_000;
const SCAN_MAX_DEPTH: usize = 16;

/// A container's 64-hex-digit id, held as its 32 bytes: fixed size, so a span
/// record can carry it by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContainerId([u8; 32]);

impl ContainerId {
    /// From 64 hex digits (either case).
    pub fn parse(hex: &str) -> Option<Self> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let digit = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
        let mut id = [0; 32];
        for (byte, pair) in id.iter_mut().zip(hex.as_chunks::<2>().0) {
            *byte = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(Self(id))
    }
}

impl std::fmt::Display for ContainerId {
    /// Lowercase, as the runtimes print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Remembers answers per (pid, cgroup id): reading /proc once per process, not per
/// socket, and still right when a pid is reused in another cgroup.
pub struct ContainerResolver {
    cache: LruCache<(u32, u64), Option<ContainerId>>,
    proc_root: String,
    /// Where cgroup v2 is mounted, if it is.
    cgroup2: Option<PathBuf>,
    /// cgroup id (the directory's inode) → container id, from the last scan.
    by_cgroup: HashMap<u64, Option<String>>,
    last_scan: Option<Instant>,
}

impl Default for ContainerResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl ContainerResolver {
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    fn with_proc_root(proc_root: &str) -> Self {
        let cgroup2 = fs::read_to_string(format!("{proc_root}/self/mountinfo"))
            .ok()
            .and_then(|text| cgroup::cgroup2_mount(&text));
        Self {
            cache: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
            proc_root: proc_root.to_owned(),
            cgroup2,
            by_cgroup: HashMap::new(),
            last_scan: None,
        }
    }

    /// The container of the cgroup v2 with this id, scanning the tree again if the id
    /// is new (rate-limited).
    fn by_cgroup_id(&mut self, cgroup_id: u64) -> Option<String> {
        if let Some(known) = self.by_cgroup.get(&cgroup_id) {
            return known.clone();
        }
        let root = self.cgroup2.clone()?;
        if self.last_scan.is_some_and(|at| at.elapsed() < RESCAN_EVERY) {
            return None;
        }
        self.last_scan = Some(Instant::now());
        self.by_cgroup = scan(&root);
        self.by_cgroup.get(&cgroup_id).cloned().flatten()
    }

    /// The container id of `pid` (in cgroup `cgroup_id`), if it runs in one. Call it
    /// while the process lives; later calls are answered from the cache.
    pub fn resolve(&mut self, pid: u32, cgroup_id: u64) -> Option<ContainerId> {
        if pid == 0 {
            return None;
        }
        if let Some(known) = self.cache.get(&(pid, cgroup_id)) {
            return *known;
        }
        let id = self
            .by_cgroup_id(cgroup_id)
            .or_else(|| {
                fs::read_to_string(format!("{}/{pid}/cgroup", self.proc_root))
                    .ok()
                    .and_then(|text| container_id(&text))
            })
            .as_deref()
            .and_then(ContainerId::parse);
        self.cache.put((pid, cgroup_id), id);
        id
    }

    /// The cached answer, without reading /proc.
    pub fn cached(&self, pid: u32, cgroup_id: u64) -> Option<ContainerId> {
        self.cache.peek(&(pid, cgroup_id)).copied().flatten()
    }
}

/// Maps every cgroup directory's id (its inode) to the container its path names.
fn scan(root: &Path) -> HashMap<u64, Option<String>> {
    let mut found = HashMap::new();
    let mut pending = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        if found.len() >= SCAN_MAX_DIRS {
            break;
        }
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        let id = dir
            .strip_prefix(root)
            .ok()
            .and_then(|rel| rel.iter().rev().find_map(|s| segment_id(s.to_str()?)));
        found.insert(meta.ino(), id);
        if depth >= SCAN_MAX_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push((entry.path(), depth + 1));
            }
        }
    }
    found
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
    fn scans_a_tree_by_inode() {
        let root = std::env::temp_dir().join(format!("otel-tcpstates-cg-{}", std::process::id()));
        let scope = root.join("system.slice").join(format!("docker-{ID}.scope"));
        fs::create_dir_all(scope.join("inner")).unwrap();
        let (scope_ino, slice_ino) = (
            fs::metadata(&scope).unwrap().ino(),
            fs::metadata(root.join("system.slice")).unwrap().ino(),
        );
        let found = scan(&root);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(found.len(), 4, "root, slice, scope, inner");
        assert_eq!(found.get(&scope_ino), Some(&Some(ID.to_owned())));
        assert_eq!(found.get(&slice_ino), Some(&None));
        assert_eq!(
            found.values().filter(|v| v.is_some()).count(),
            2,
            "the scope and below"
        );
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
        let id = ContainerId::parse(ID);
        assert!(id.is_some());
        assert_eq!(resolver.resolve(42, 7), id);
        fs::remove_dir_all(&dir).unwrap();
        // The process is gone: the answer comes from the cache.
        assert_eq!(resolver.resolve(42, 7), id);
        assert_eq!(
            resolver.cached(42, 7).map(|id| id.to_string()).as_deref(),
            Some(ID)
        );
        assert_eq!(
            resolver.resolve(42, 8),
            None,
            "another cgroup is looked up afresh"
        );
        assert_eq!(resolver.resolve(0, 7), None);
    }
}
