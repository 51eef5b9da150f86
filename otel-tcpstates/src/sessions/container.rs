//! The container a process runs in, as the 64-hex-digit id Docker, containerd,
//! CRI-O and Podman give their containers: from `/proc/PID/cgroup` while the
//! process lives (its cgroup v2 path checked against the cgroup id the kernel
//! reported), else from a walk of the cgroup v2 tree by that id (it outlives the
//! process). These reads block: [`super::container_lookups`] runs them off the
//! event loop.
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::kernel::cgroup;

/// A walk of the cgroup tree runs at most this often.
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// Bounds on a walk, for hosts with very large cgroup trees.
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

/// What a lookup found, and for what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub container: Option<ContainerId>,
    /// True for every process in the cgroup: its cgroup v2 path named a container,
    /// or named none on a host without cgroup v1 hierarchies (where a v1 path could
    /// still name one). Otherwise it holds for this process only.
    pub per_cgroup: bool,
}

impl Answer {
    const NONE: Answer = Answer {
        container: None,
        per_cgroup: false,
    };
}

/// Finds the container of a (pid, cgroup id): blocking reads of /proc and cgroupfs.
pub struct ContainerResolver {
    proc_root: String,
    /// Where cgroup v2 is mounted, if it is.
    cgroup2: Option<PathBuf>,
    /// No cgroup v1 hierarchy is mounted: the v2 path says it all.
    unified: bool,
    /// cgroup id (the directory's inode) → container, from the last walk.
    by_cgroup: HashMap<u64, Option<ContainerId>>,
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

    pub(super) fn with_proc_root(proc_root: &str) -> Self {
        let mountinfo =
            fs::read_to_string(format!("{proc_root}/self/mountinfo")).unwrap_or_default();
        Self {
            proc_root: proc_root.to_owned(),
            cgroup2: cgroup::cgroup2_mount(&mountinfo),
            unified: !mountinfo
                .lines()
                .filter_map(|line| line.split_once(" - "))
                .any(|(_, fs)| fs.split_whitespace().next() == Some("cgroup")),
            by_cgroup: HashMap::new(),
            last_scan: None,
        }
    }

    fn known(&self, cgroup_id: u64) -> Option<Answer> {
        let container = *self.by_cgroup.get(&cgroup_id)?;
        Some(Answer {
            container,
            per_cgroup: container.is_some() || self.unified,
        })
    }

    /// The answer without walking the tree, if there is one: from the last walk,
    /// or from `/proc/PID/cgroup` while the process lives. `None`: it takes a walk.
    pub fn quick(&self, pid: u32, cgroup_id: u64) -> Option<Answer> {
        if pid == 0 {
            return Some(Answer::NONE);
        }
        if let Some(known) = self.known(cgroup_id).filter(|a| a.per_cgroup) {
            return Some(known);
        }
        let Ok(text) = fs::read_to_string(format!("{}/{pid}/cgroup", self.proc_root)) else {
            // Gone: only its cgroup id is left to go by.
            return match (&self.cgroup2, self.known(cgroup_id)) {
                (_, Some(known)) => Some(known),
                (None, None) => Some(Answer::NONE),
                (Some(_), None) => None,
            };
        };
        let v2_path = text.lines().find_map(|line| line.strip_prefix("0::"));
        // The inode of the directory the v2 path names, where this process sees it
        // (in a cgroup namespace of its own, a path such as `/../..` is not).
        let v2_ino = match (&self.cgroup2, v2_path) {
            (Some(root), Some(path)) if !path.starts_with("/..") => {
                fs::metadata(root.join(path.trim_start_matches('/')))
                    .ok()
                    .map(|meta| meta.ino())
            }
            _ => None,
        };
        let in_this_cgroup = v2_ino == Some(cgroup_id);
        if in_this_cgroup {
            let container = v2_path.and_then(path_id);
            if container.is_some() || self.unified {
                return Some(Answer {
                    container,
                    per_cgroup: true,
                });
            }
        }
        // The v1 hierarchies' paths, and the v2 one unless it is known to be
        // another cgroup's (the process moved since).
        let moved = v2_ino.is_some() && !in_this_cgroup;
        let v1_text: String = text
            .lines()
            .filter(|line| !(moved && line.starts_with("0::")))
            .flat_map(|line| [line, "\n"])
            .collect();
        let container = container_id(&v1_text)
            .as_deref()
            .and_then(ContainerId::parse);
        if container.is_some() || !moved {
            return Some(Answer {
                container,
                per_cgroup: false,
            });
        }
        // It moved to another cgroup since: only the cgroup id tells.
        self.known(cgroup_id)
    }

    /// How long until the tree may be walked again.
    pub fn scan_wait(&self) -> Duration {
        self.last_scan.map_or(Duration::ZERO, |at| {
            RESCAN_EVERY.saturating_sub(at.elapsed())
        })
    }

    /// Walks the cgroup v2 tree again.
    pub fn rescan(&mut self) {
        let started = Instant::now();
        self.last_scan = Some(started);
        if let Some(root) = &self.cgroup2 {
            self.by_cgroup = scan(root);
            tracing::debug!(
                "walked {} cgroup directories in {:?} to find containers",
                self.by_cgroup.len(),
                started.elapsed()
            );
        }
    }

    /// The answer once the tree was walked after the question was asked.
    pub fn after_scan(&self, cgroup_id: u64) -> Answer {
        self.known(cgroup_id).unwrap_or(Answer::NONE)
    }
}

/// The innermost container a cgroup path names.
fn path_id(path: &str) -> Option<ContainerId> {
    path.rsplit('/')
        .find_map(segment_id)
        .as_deref()
        .and_then(ContainerId::parse)
}

/// Maps every cgroup directory's id (its inode) to the container its path names.
fn scan(root: &Path) -> HashMap<u64, Option<ContainerId>> {
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
            .and_then(|rel| rel.iter().rev().find_map(|s| segment_id(s.to_str()?)))
            .as_deref()
            .and_then(ContainerId::parse);
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
pub(super) mod tests {
    use super::*;

    pub(in crate::sessions) const ID: &str =
        "3f4e1c9a7b2d5e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071";

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
        assert_eq!(found.get(&scope_ino), Some(&ContainerId::parse(ID)));
        assert_eq!(found.get(&slice_ino), Some(&None));
        assert_eq!(
            found.values().filter(|v| v.is_some()).count(),
            2,
            "the scope and below"
        );
    }

    /// A fake /proc and cgroup v2 mount: `root/proc/42/cgroup` names `path`.
    pub(in crate::sessions) fn fake_host(
        tag: &str,
        path: &str,
        v1: bool,
    ) -> (PathBuf, ContainerResolver, u64) {
        let root =
            std::env::temp_dir().join(format!("otel-tcpstates-{tag}-{}", std::process::id()));
        let cgroup2 = root.join("cgroup");
        fs::create_dir_all(cgroup2.join(path.trim_start_matches('/'))).unwrap();
        fs::create_dir_all(root.join("proc/42")).unwrap();
        fs::create_dir_all(root.join("proc/self")).unwrap();
        let v1_line = if v1 { "4:memory:/\n" } else { "" };
        fs::write(root.join("proc/42/cgroup"), format!("{v1_line}0::{path}\n")).unwrap();
        let v1_mount = if v1 {
            "37 30 0:33 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        } else {
            ""
        };
        fs::write(
            root.join("proc/self/mountinfo"),
            format!(
                "{v1_mount}35 24 0:30 / {} rw - cgroup2 cgroup2 rw\n",
                cgroup2.display()
            ),
        )
        .unwrap();
        let ino = fs::metadata(cgroup2.join(path.trim_start_matches('/')))
            .unwrap()
            .ino();
        let resolver = ContainerResolver::with_proc_root(root.join("proc").to_str().unwrap());
        (root, resolver, ino)
    }

    #[test]
    fn a_live_process_is_answered_from_proc_for_its_whole_cgroup() {
        let (root, resolver, ino) =
            fake_host("live", &format!("/system.slice/docker-{ID}.scope"), true);
        let answer = resolver.quick(42, ino);
        let other_cgroup = resolver.quick(42, ino + 1_000_000);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            answer,
            Some(Answer {
                container: ContainerId::parse(ID),
                per_cgroup: true
            })
        );
        assert_eq!(other_cgroup, None, "moved since: it takes a walk");
        assert_eq!(resolver.quick(0, ino), Some(Answer::NONE));
    }

    #[test]
    fn a_path_outside_this_cgroup_namespace_still_names_the_container() {
        let (root, resolver, ino) = fake_host("ns", "/user.slice", false);
        fs::write(
            root.join("proc/42/cgroup"),
            format!("0::/../../system.slice/docker-{ID}.scope\n"),
        )
        .unwrap();
        let answer = resolver.quick(42, ino + 1_000_000);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            answer,
            Some(Answer {
                container: ContainerId::parse(ID),
                per_cgroup: false
            })
        );
    }

    #[test]
    fn no_container_holds_for_the_cgroup_only_without_v1() {
        for v1 in [false, true] {
            let (root, resolver, ino) = fake_host(&format!("plain{v1}"), "/user.slice", v1);
            let answer = resolver.quick(42, ino);
            fs::remove_dir_all(&root).unwrap();
            assert_eq!(
                answer,
                Some(Answer {
                    container: None,
                    per_cgroup: !v1
                }),
                "v1 mounted: {v1}"
            );
        }
    }

    #[test]
    fn a_gone_process_is_found_by_a_walk() {
        let (root, mut resolver, ino) =
            fake_host("gone", &format!("/system.slice/docker-{ID}.scope"), false);
        fs::remove_dir_all(root.join("proc/42")).unwrap();
        assert_eq!(resolver.quick(42, ino), None, "it takes a walk");
        assert_eq!(resolver.scan_wait(), Duration::ZERO);
        resolver.rescan();
        fs::remove_dir_all(&root).unwrap();
        assert!(resolver.scan_wait() > Duration::ZERO, "rate-limited");
        let found = Answer {
            container: ContainerId::parse(ID),
            per_cgroup: true,
        };
        assert_eq!(resolver.after_scan(ino), found);
        assert_eq!(resolver.quick(42, ino), Some(found), "remembered");
        assert_eq!(resolver.after_scan(ino + 1_000_000), Answer::NONE);
    }
}
