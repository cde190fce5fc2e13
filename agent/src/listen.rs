//! TCP listeners that a new agent opens beside the old one's while a rolling update surges
//! (issue 4): both agents run at once on the node, on the same ports.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use socket2::{Domain, Protocol, Socket, Type};

/// Backlog of each listener: enough for every probe of a pod, or every scrape, arriving at once.
const BACKLOG: i32 = 128;

/// A non-blocking TCP listener on `addr` with SO_REUSEADDR and SO_REUSEPORT, so that a new agent
/// binds the address while the old one still holds it and the kernel shares connections between
/// the two until the old one closes. An IPv6 address also takes IPv4 (dual-stack).
pub fn shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from(socket))
}

/// Gives `listener` the sk_reuseport `program` (`SO_ATTACH_REUSEPORT_EBPF`), which holds for its
/// whole SO_REUSEPORT group: the agent's program of attach type
/// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, under which the kernel moves the connections a closing
/// listener has queued to another listener of the group instead of resetting them. Without it, a
/// killed agent's queued probes would fail although the agent beside it listens on the port.
pub fn migrate_on_close(listener: &TcpListener, program: BorrowedFd<'_>) -> io::Result<()> {
    let fd: libc::c_int = program.as_raw_fd();
    // SAFETY: the option's value is an int (the program's fd), passed with its size; both sockets
    // and the program outlive the call.
    let result = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_EBPF,
            (&raw const fd).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
