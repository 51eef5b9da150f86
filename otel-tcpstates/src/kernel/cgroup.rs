//! Where cgroup v2 is mounted: the packet programs attach to its root, and
//! container attribution walks its tree.
use std::path::PathBuf;

/// The mount point of cgroup v2 from a mountinfo file (field 5 is the mount point;
/// the filesystem type follows the ` - ` separator). `/sys/fs/cgroup` on pure v2
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next()? == "cgroup2")
            .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// This process's view of the cgroup v2 mount.
pub fn cgroup2_root() -> Option<PathBuf> {
    cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let mountinfo = "24 31 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
            35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("24 31 0:22 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }
}
