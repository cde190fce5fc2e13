//! One attempt of the check: a connection to an address outside the pod, and whether it arrived
//! on the outbound port with its original destination and its nonce.

use std::{
    fmt,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener},
    thread,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use nix::sys::socket::{getsockopt, sockopt};
use probe_bypass_rewrite::contract::{VALIDATION_TARGET_V4, VALIDATION_TARGET_V6};
use socket2::{Domain, Protocol, Socket, Type};

/// Bytes of the nonce the client sends and the listener must receive.
const NONCE_LEN: usize = 16;
/// Bound on the connect of an attempt. A redirected connection is to loopback and is made at
/// once; one that is not redirected goes nowhere (its SYN is looped back and dropped) and would
/// wait for the whole attempt, delaying the next one, which may be the first the datapath redirects.
const CONNECT: Duration = Duration::from_millis(100);
/// The destination ports an attempt picks from: above the mesh's own ports (15000-15999) and below
/// the usual ephemeral range, so that no well-known port an exclusion list is likely to name.
const PORTS: std::ops::RangeInclusive<u16> = 20000..=31999;

/// The family of an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// Where the datapath sends a redirected connection of this family: the proxy's outbound port
    /// on the loopback address.
    fn loopback(self, port: u16) -> SocketAddr {
        match self {
            Self::V4 => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            Self::V6 => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        }
    }

    /// The range the check aims at unless told otherwise: one no network routes (RFC 5737
    /// TEST-NET-1, RFC 3849's documentation prefix).
    pub fn default_range(self) -> IpNet {
        match self {
            Self::V4 => IpNet::V4(VALIDATION_TARGET_V4),
            Self::V6 => IpNet::V6(VALIDATION_TARGET_V6),
        }
    }
}

/// A random address of `range` (neither its first nor its last when it has more than two) on a
/// random port of [`PORTS`].
pub fn random_target(range: IpNet) -> SocketAddr {
    let bytes = random_bytes::<18>();
    let [.., p0, p1] = bytes;
    let mut host = [0; 16];
    host.copy_from_slice(&bytes[..16]);
    let random = u128::from_be_bytes(host);
    let span = u16::from_be_bytes([p0, p1]) % (PORTS.end() - PORTS.start() + 1);
    let port = PORTS.start() + span;
    let bits = u32::from(range.max_prefix_len() - range.prefix_len());
    let offset = match 1u128.checked_shl(bits) {
        Some(size) if size <= 2 => random % size,
        Some(size) => 1 + random % (size - 2),
        None => random.max(1),
    };
    let ip: IpAddr = match range.trunc() {
        IpNet::V4(net) => {
            // At most 32 host bits: the offset fits.
            let offset = u32::try_from(offset).unwrap_or(u32::MAX);
            Ipv4Addr::from(u32::from(net.network()).wrapping_add(offset)).into()
        }
        IpNet::V6(net) => Ipv6Addr::from(u128::from(net.network()).wrapping_add(offset)).into(),
    };
    SocketAddr::new(ip, port)
}

/// The stand-in for the sidecar's outbound listener, on the loopback address of one family.
pub struct Outbound {
    listener: TcpListener,
    /// Where its attempts connect to; its family is the listener's.
    range: IpNet,
}

impl Outbound {
    /// Listens on the outbound port on loopback, for attempts that connect into `range` (whose
    /// family it takes); fails when something holds the port already (the sidecar, if it started
    /// before this container).
    pub fn bind(range: IpNet, port: u16) -> io::Result<Self> {
        let family = Family::of(range.addr());
        let addr = family.loopback(port);
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // A listener left in TIME_WAIT by the previous run of this container must not block this one.
        socket.set_reuse_address(true)?;
        if family == Family::V6 {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(64)?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            listener: socket.into(),
            range,
        })
    }

    pub fn family(&self) -> Family {
        Family::of(self.range.addr())
    }
}

/// What a passed attempt saw.
#[derive(Debug)]
pub struct Proof {
    pub target: SocketAddr,
    /// The client's own address, as the listener saw the connection come from.
    pub client: SocketAddr,
}

/// Why an attempt did not pass.
#[derive(Debug)]
pub enum Miss {
    /// The connect failed: nothing redirected it (the address is never routed).
    Connect {
        target: SocketAddr,
        error: io::Error,
    },
    /// The connect succeeded but the connection never reached the listener.
    NotArrived { target: SocketAddr },
    /// It arrived, but `SO_ORIGINAL_DST` did not give the destination asked for.
    OriginalDst {
        target: SocketAddr,
        answer: io::Result<SocketAddr>,
    },
    /// It arrived with its destination, but the nonce did not.
    Nonce { target: SocketAddr, error: String },
    /// The check itself could not run (a socket call failed).
    Local(io::Error),
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect { target, error } => {
                write!(f, "a connection to {target} was not redirected ({error})")
            }
            Self::NotArrived { target } => write!(
                f,
                "a connection to {target} was made but did not arrive on the outbound port"
            ),
            Self::OriginalDst {
                target,
                answer: Ok(got),
            } => write!(
                f,
                "a connection to {target} arrived on the outbound port, but its original \
                 destination (SO_ORIGINAL_DST) reads {got}"
            ),
            Self::OriginalDst {
                target,
                answer: Err(error),
            } => write!(
                f,
                "a connection to {target} arrived on the outbound port, but its original \
                 destination (SO_ORIGINAL_DST) cannot be read: {error}"
            ),
            Self::Nonce { target, error } => write!(
                f,
                "a connection to {target} arrived on the outbound port, but not the data sent on \
                 it: {error}"
            ),
            Self::Local(error) => write!(f, "the check could not run: {error}"),
        }
    }
}

/// One attempt, bounded by `bound`: connects to a fresh random `target`, bound to the loopback
/// device, and passes only if `outbound` accepts this very connection with `target` as its
/// original destination and the nonce written on it.
pub fn attempt(outbound: &Outbound, bound: Duration) -> Result<Proof, Miss> {
    let deadline = Instant::now() + bound;
    let target = random_target(outbound.range);
    let client = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(Miss::Local)?;
    // Bound to `lo`, the connection can only ever reach an address of this pod: without the
    // datapath its packets never leave the pod, whatever routes the pod has.
    client.bind_device(Some(b"lo")).map_err(Miss::Local)?;
    client
        .connect_timeout(&target.into(), CONNECT.min(bound))
        .map_err(|error| Miss::Connect { target, error })?;
    let local = client
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_socket())
        .ok_or_else(|| Miss::Local(io::Error::other("the client socket has no address")))?;
    let nonce = random_bytes::<NONCE_LEN>();
    let mut client: std::net::TcpStream = client.into();
    client.write_all(&nonce).map_err(|error| Miss::Nonce {
        target,
        error: format!("writing it: {error}"),
    })?;
    let mut accepted = accept_from(&outbound.listener, local, deadline)
        .map_err(Miss::Local)?
        .ok_or(Miss::NotArrived { target })?;
    let answer = original_dst(&accepted, outbound.family());
    if !matches!(answer, Ok(got) if got == target) {
        return Err(Miss::OriginalDst { target, answer });
    }
    let left = deadline.saturating_duration_since(Instant::now());
    accepted
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .map_err(Miss::Local)?;
    let mut got = [0u8; NONCE_LEN];
    match accepted.read_exact(&mut got) {
        Ok(()) if got == nonce => Ok(Proof {
            target,
            client: local,
        }),
        Ok(()) => Err(Miss::Nonce {
            target,
            error: "other bytes arrived".to_owned(),
        }),
        Err(error) => Err(Miss::Nonce {
            target,
            error: error.to_string(),
        }),
    }
}

/// Accepts connections until the one from `client` arrives or `deadline` passes; any other
/// connection is closed.
fn accept_from(
    listener: &TcpListener,
    client: SocketAddr,
    deadline: Instant,
) -> io::Result<Option<std::net::TcpStream>> {
    loop {
        match listener.accept() {
            Ok((stream, peer)) if peer == client => {
                stream.set_nonblocking(false)?;
                return Ok(Some(stream));
            }
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(error) => return Err(error),
        }
    }
}

/// The original destination of an accepted connection, as the proxy reads it:
/// `getsockopt(SO_ORIGINAL_DST)` for IPv4, `getsockopt(IP6T_SO_ORIGINAL_DST)` for IPv6.
fn original_dst(stream: &std::net::TcpStream, family: Family) -> io::Result<SocketAddr> {
    match family {
        Family::V4 => {
            let addr = getsockopt(stream, sockopt::OriginalDst)?;
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Ok(SocketAddrV4::new(ip, u16::from_be(addr.sin_port)).into())
        }
        Family::V6 => {
            let addr = getsockopt(stream, sockopt::Ip6tOriginalDst)?;
            let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
            Ok(SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, 0).into())
        }
    }
}

/// Bytes from the kernel's random source.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: the pointer and length describe the unfilled part of `bytes`.
        let got = unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if got > 0 {
            filled += got as usize;
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_targets_are_documentation_addresses_on_unremarkable_ports() {
        for _ in 0..200 {
            let v4 = random_target(Family::V4.default_range());
            let IpAddr::V4(ip) = v4.ip() else {
                panic!("{v4}")
            };
            assert_eq!(ip.octets()[..3], [192, 0, 2], "{v4}");
            assert!(ip.octets()[3] != 0 && ip.octets()[3] != 255, "{v4}");
            assert!(PORTS.contains(&v4.port()), "{v4}");
            let v6 = random_target(Family::V6.default_range());
            let IpAddr::V6(ip) = v6.ip() else {
                panic!("{v6}")
            };
            assert_eq!(ip.segments()[..2], [0x2001, 0xdb8], "{v6}");
            assert!(PORTS.contains(&v6.port()), "{v6}");
        }
    }

    #[test]
    fn random_targets_stay_inside_a_given_range() {
        let net = |text: &str| text.parse::<IpNet>().expect("a range");
        for _ in 0..200 {
            let wide = random_target(net("10.96.0.0/12"));
            assert!(net("10.96.0.0/12").contains(&wide.ip()), "{wide}");
            assert_ne!(wide.ip(), net("10.96.0.0/12").network(), "{wide}");
            assert_ne!(wide.ip(), net("10.96.0.0/12").broadcast(), "{wide}");
            let small = random_target(net("10.1.2.4/30"));
            assert!(
                ["10.1.2.5", "10.1.2.6"].contains(&small.ip().to_string().as_str()),
                "{small}"
            );
            assert_eq!(
                random_target(net("10.1.2.3/32")).ip().to_string(),
                "10.1.2.3"
            );
            let v6 = random_target(net("fd00:10::/108"));
            assert!(net("fd00:10::/108").contains(&v6.ip()), "{v6}");
            assert!(PORTS.contains(&v6.port()), "{v6}");
        }
    }

    #[test]
    fn without_a_datapath_an_attempt_never_passes() {
        // No eBPF here: the connection to a documentation address, bound to `lo`, goes nowhere.
        let outbound = Outbound::bind(Family::V4.default_range(), 0).expect("listen");
        let miss = attempt(&outbound, Duration::from_millis(300)).expect_err("no datapath");
        assert!(
            matches!(miss, Miss::Connect { .. } | Miss::NotArrived { .. }),
            "{miss}"
        );
    }
}
