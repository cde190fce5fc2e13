//! Finding the cgroup v2 hierarchy that the cgroup programs attach to.

use std::{
    ffi::OsStr,
    fs,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use super::DatapathError;
use crate::defaults::PROC_MOUNTS;

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on current nodes,
/// `/sys/fs/cgroup/unified` on hybrid ones, and elsewhere on some. Read from `/proc/mounts`, so
/// the answer is the one that holds for this machine.
pub fn cgroup2_mount() -> Result<PathBuf, DatapathError> {
    let mounts = fs::read(PROC_MOUNTS).map_err(|source| DatapathError::ReadMounts {
        path: PathBuf::from(PROC_MOUNTS),
        source,
    })?;
    find_cgroup2_mount(&mounts).ok_or(DatapathError::NoCgroup2)
}

/// The mount point of the first `cgroup2` entry of a mount table in `/proc/mounts` format.
fn find_cgroup2_mount(mounts: &[u8]) -> Option<PathBuf> {
    mounts.split(|&byte| byte == b'\n').find_map(|line| {
        let mut fields = line.split(|&byte| byte == b' ');
        let (_source, mount_point, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == b"cgroup2").then(|| unescape(mount_point))
    })
}

/// Undoes the octal escapes (`\040` for a space, and so on) that the kernel writes in place of
/// the characters that would break the table's format.
fn unescape(field: &[u8]) -> PathBuf {
    let mut bytes = Vec::with_capacity(field.len());
    let mut rest = field;
    while let Some((&byte, tail)) = rest.split_first() {
        let octal = tail
            .get(..3)
            .filter(|digits| {
                byte == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
            })
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
        match octal {
            Some(unescaped) => {
                bytes.push(unescaped);
                rest = &tail[3..];
            }
            None => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    Path::new(OsStr::from_bytes(&bytes)).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_hierarchy_of_a_hybrid_host() {
        let mounts = b"tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            find_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_the_single_hierarchy_of_a_current_host() {
        let mounts = b"sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            find_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn reports_no_hierarchy_on_a_cgroup_v1_only_host() {
        let mounts = b"cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert_eq!(find_cgroup2_mount(mounts), None);
    }

    #[test]
    fn decodes_escaped_characters_in_the_mount_point() {
        let mounts = b"none /mnt/my\\040cgroups\\134v2 cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2_mount(mounts),
            Some(PathBuf::from("/mnt/my cgroups\\v2"))
        );
    }
}
