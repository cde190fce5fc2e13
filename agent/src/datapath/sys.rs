//! The `bpf()` commands for links that aya 0.14 does not offer whole: create one for any cgroup
//! hook (aya cannot turn a getsockopt link into a pinnable one) or a network namespace's
//! sk_lookup hook, pin it, open a pinned one, read which cgroup it is attached to, and swap its
//! program in place.
//!
//! `BPF_LINK_UPDATE` is what lets a restarted or upgraded agent replace its programs with no moment
//! in which none is attached (Linux 5.7+ for cgroup links, 5.9+ for network namespace links).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` (no target-specific fields).
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `enum bpf_attach_type` values of the hooks the datapath uses.
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    Connect4 = 10,
    Connect6 = 11,
    GetSockopt = 21,
    /// A network namespace's socket lookup (the target is the namespace's nsfs file).
    SkLookup = 36,
}

/// `union bpf_attr` for `BPF_LINK_DETACH`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// `union bpf_attr` for `BPF_LINK_UPDATE`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` for a cgroup link.
#[repr(C)]
#[derive(Default)]
struct CgroupLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// `BPF_LINK_TYPE_CGROUP`.
const LINK_TYPE_CGROUP: u32 = 3;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, and
    // its size is passed along; the kernel zero-extends a shorter attribute.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Takes ownership of the file descriptor a `bpf()` command returned.
fn owned_fd(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf() returned no fd"))?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the object pinned at `path` (on bpffs).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    owned_fd(bpf(BPF_OBJ_GET, &mut attr)?)
}

/// Pins `object` at `path` (on bpffs): it then lives until the file is removed.
pub fn obj_pin(object: impl AsFd, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: object.as_fd().as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Attaches `program` to `target` (a cgroup's directory, or a network namespace for
/// [`AttachType::SkLookup`]) through a new bpf_link. Both kinds of link are multi-attach: programs
/// other tools attached to the same cgroup or namespace keep running.
pub fn link_create(
    program: impl AsFd,
    target: impl AsFd,
    attach_type: AttachType,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_fd().as_raw_fd() as u32,
        target_fd: target.as_fd().as_raw_fd() as u32,
        attach_type: attach_type as u32,
        flags: 0,
    };
    owned_fd(bpf(BPF_LINK_CREATE, &mut attr)?)
}

/// The id of the cgroup a cgroup link is attached to (the inode number of its directory).
pub fn link_cgroup_id(link: impl AsFd) -> io::Result<u64> {
    let mut info = CgroupLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_fd().as_raw_fd() as u32,
        info_len: size_of::<CgroupLinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.link_type != LINK_TYPE_CGROUP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a cgroup link (link type {})", info.link_type),
        ));
    }
    Ok(info.cgroup_id)
}

/// Detaches `link` from its hook now, whoever else still holds it (Linux 5.9 for cgroup links, 5.8
/// for netns links). The link object lives on, attached to nothing, until its last holder lets go.
pub fn link_detach(link: impl AsFd) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// Makes `link` run `program` instead of whatever it ran, atomically.
pub fn link_update(link: impl AsFd, program: impl AsFd) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: program.as_fd().as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}
