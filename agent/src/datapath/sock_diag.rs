//! The TCP sockets listening on a port in the calling thread's network namespace, asked of the
//! kernel through sock_diag (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`).
//!
//! Asked for listening sockets only, the kernel walks only its table of listening sockets.
//! Reading /proc/net/tcp and tcp6 walks the established connections' table too, which every
//! namespace shares with the host's and which is sized by the host's memory, not by the pod: about
//! 14 ms for the two tables on a 24 GiB machine (262,144 buckets), whatever the pod holds. That was
//! nearly all of what serving a pod whose proxy does not listen yet cost a starting agent.

use std::{io, os::fd::AsRawFd as _};

/// `SOCK_DIAG_BY_FAMILY`, the request and reply message type.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`.
const REQUEST_LEN: usize = 56;
/// `struct inet_diag_msg`, up to and including `idiag_inode`.
const REPLY_LEN: usize = 72;
/// `TCP_LISTEN` in the kernel's `enum tcp_state`.
const TCP_LISTEN: u8 = 10;

/// The inodes of the TCP sockets of `family` (`AF_INET` or `AF_INET6`) listening on `port` in
/// the calling thread's network namespace.
pub fn listening_inodes(family: u8, port: u16) -> io::Result<Vec<u64>> {
    // SAFETY: a plain syscall with integer arguments; the descriptor is checked, then owned.
    let socket = unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    let request = request(family, port);
    // SAFETY: `request` is live for the call and its length is given; an unbound netlink socket
    // sends to the kernel.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut inodes = Vec::new();
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        // SAFETY: `buffer` is live and writable for its whole length. MSG_TRUNC makes the call
        // return a datagram's full length, so that one larger than the buffer is noticed.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_TRUNC,
            )
        };
        let received = usize::try_from(received).map_err(|_| io::Error::last_os_error())?;
        if received > buffer.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "sock_diag reply larger than the buffer",
            ));
        }
        if parse_reply(&buffer[..received], port, &mut inodes)? {
            return Ok(inodes);
        }
    }
}

/// A dump request for the TCP sockets of `family` listening on `port`: the kernel filters on the
/// state and the local port itself.
fn request(family: u8, port: u16) -> [u8; NLMSG_HDRLEN + REQUEST_LEN] {
    let mut message = [0_u8; NLMSG_HDRLEN + REQUEST_LEN];
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    message[0..4].copy_from_slice(&len.to_ne_bytes());
    message[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    message[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    message[8..12].copy_from_slice(&1_u32.to_ne_bytes()); // sequence number
    let body = &mut message[NLMSG_HDRLEN..];
    body[0] = family;
    body[1] = libc::IPPROTO_TCP as u8;
    body[4..8].copy_from_slice(&(1_u32 << TCP_LISTEN).to_ne_bytes()); // idiag_states
    body[8..10].copy_from_slice(&port.to_be_bytes()); // id.idiag_sport
    message
}

/// Adds to `inodes` those of the listening sockets on `port` in one datagram of the reply, and
/// says whether the reply is complete.
fn parse_reply(mut datagram: &[u8], port: u16, inodes: &mut Vec<u64>) -> io::Result<bool> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply");
    while datagram.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(datagram[0..4].try_into().map_err(|_| malformed())?);
        let len = usize::try_from(len).map_err(|_| malformed())?;
        if len < NLMSG_HDRLEN || len > datagram.len() {
            return Err(malformed());
        }
        let kind = u16::from_ne_bytes([datagram[4], datagram[5]]);
        let payload = &datagram[NLMSG_HDRLEN..len];
        match kind {
            // Both carry an errno, negated (0 for none).
            NLMSG_DONE | NLMSG_ERROR => {
                let errno = payload.get(0..4).map_or(0, |bytes| {
                    i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
                });
                if errno < 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                return Ok(true);
            }
            SOCK_DIAG_BY_FAMILY if payload.len() >= REPLY_LEN => {
                let state = payload[1];
                let local_port = u16::from_be_bytes([payload[4], payload[5]]);
                let inode =
                    u32::from_ne_bytes([payload[68], payload[69], payload[70], payload[71]]);
                if state == TCP_LISTEN && local_port == port {
                    inodes.push(u64::from(inode));
                }
            }
            _ => {}
        }
        // Messages are aligned to 4 bytes.
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
        os::unix::fs::MetadataExt as _,
    };

    use super::*;

    /// A reply message as the kernel writes it: a header, then `payload`.
    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(NLMSG_HDRLEN + payload.len()).unwrap_or(u32::MAX);
        let mut message = Vec::new();
        message.extend_from_slice(&len.to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&[0; 10]);
        message.extend_from_slice(payload);
        message.resize(message.len().next_multiple_of(4), 0);
        message
    }

    fn socket(state: u8, port: u16, inode: u32) -> Vec<u8> {
        let mut payload = vec![0_u8; REPLY_LEN + 8];
        payload[0] = libc::AF_INET as u8;
        payload[1] = state;
        payload[4..6].copy_from_slice(&port.to_be_bytes());
        payload[68..72].copy_from_slice(&inode.to_ne_bytes());
        message(SOCK_DIAG_BY_FAMILY, &payload)
    }

    #[test]
    fn listeners_on_the_port_are_kept_until_the_dump_is_done() {
        let mut datagram = socket(TCP_LISTEN, 15003, 4242);
        datagram.extend(socket(TCP_LISTEN, 15001, 4343));
        datagram.extend(socket(1, 15003, 4444)); // established
        let mut inodes = Vec::new();
        assert!(!parse_reply(&datagram, 15003, &mut inodes).expect("parsed"));
        assert_eq!(inodes, vec![4242]);
        let done = message(NLMSG_DONE, &0_i32.to_ne_bytes());
        assert!(parse_reply(&done, 15003, &mut inodes).expect("parsed"));
    }

    #[test]
    fn an_error_or_a_truncated_message_fails() {
        let error = message(NLMSG_ERROR, &(-libc::ENOENT).to_ne_bytes());
        let failed = parse_reply(&error, 15003, &mut Vec::new()).expect_err("an error");
        assert_eq!(failed.raw_os_error(), Some(libc::ENOENT));
        let mut cut = socket(TCP_LISTEN, 15003, 4242);
        cut.truncate(40);
        assert!(parse_reply(&cut, 15003, &mut Vec::new()).is_err());
    }

    /// The inode of a socket, as sock_diag and /proc/<pid>/fd name it.
    fn inode(listener: &TcpListener) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .expect("the socket's inode")
            .ino()
    }

    #[test]
    fn finds_a_listener_of_this_process_in_each_family() {
        let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen on IPv4");
        let port = v4.local_addr().expect("its port").port();
        let found = listening_inodes(libc::AF_INET as u8, port).expect("asked sock_diag");
        assert_eq!(found, vec![inode(&v4)]);
        // No IPv6 on this machine: nothing more to check.
        let Ok(v6) = TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) else {
            return;
        };
        let found = listening_inodes(libc::AF_INET6 as u8, port).expect("asked sock_diag");
        assert_eq!(found, vec![inode(&v6)]);
        drop(v6);
        assert!(
            listening_inodes(libc::AF_INET6 as u8, port)
                .expect("asked sock_diag")
                .is_empty()
        );
    }
}
