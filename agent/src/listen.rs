//! TCP listeners that a new agent opens beside the old one's while a rolling update surges
//! (issue 4): both agents run at once on the node, on the same ports.

use std::{
    io,
    net::{SocketAddr, TcpListener},
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
