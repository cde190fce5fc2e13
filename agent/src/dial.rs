//! TCP connects made from inside a pod's network namespace: the one a tcpSocket probe stands for,
//! and the connection the prober talks over.

use std::{
    fmt, io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::netns::{Netns, NetnsError, NetnsWorker};

/// Why one address could not be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Refused,
    TimedOut(Duration),
    Other(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused => f.write_str("connection refused"),
            Self::TimedOut(after) => write!(f, "no answer within {after:?}"),
            Self::Other(error) => f.write_str(error),
        }
    }
}

/// The result of dialing a list of addresses in turn.
#[derive(Debug)]
pub enum Dialed {
    /// This address accepted the connection (which was then reset, leaving no TIME_WAIT behind).
    Connected(SocketAddr),
    /// No address accepted; each with its reason, in the order tried.
    Failed(Vec<(SocketAddr, Failure)>),
}

/// Connects to each of `targets` in turn from inside `netns` until one accepts, all within `timeout`.
///
/// The sockets are created in the pod's namespace on the netns worker; the connects run on tokio.
/// Each socket has SO_LINGER 0, so closing it after a successful connect resets the connection
/// instead of leaving a TIME_WAIT entry in the pod for every probe.
pub async fn dial(
    worker: &NetnsWorker,
    netns: &Arc<Netns>,
    targets: &[SocketAddr],
    timeout: Duration,
) -> Result<Dialed, NetnsError> {
    let deadline = Instant::now() + timeout;
    let domains: Vec<Domain> = targets.iter().map(|a| Domain::for_address(*a)).collect();
    let sockets = worker
        .run(netns, move || {
            domains
                .into_iter()
                .map(new_socket)
                .collect::<io::Result<Vec<_>>>()
        })
        .await?;
    let mut failures = Vec::with_capacity(targets.len());
    for (&addr, socket) in targets.iter().zip(sockets) {
        let failure = match connect(socket, addr, deadline, timeout).await {
            Ok(()) => return Ok(Dialed::Connected(addr)),
            Err(failure) => failure,
        };
        failures.push((addr, failure));
    }
    Ok(Dialed::Failed(failures))
}

/// Opens a TCP connection to `addr` from inside `netns` and hands it over, for a prober that talks
/// on it. Like [`dial`]'s sockets it has SO_LINGER 0: the prober closes first (the kubelet's does
/// too), and a reset instead of a FIN leaves no TIME_WAIT entry in the pod. Unbounded in time: the
/// caller bounds the whole probe.
pub async fn connect_stream(
    worker: &NetnsWorker,
    netns: &Arc<Netns>,
    addr: SocketAddr,
) -> Result<TcpStream, StreamError> {
    let domain = Domain::for_address(addr);
    let socket = worker.run(netns, move || new_socket(domain)).await?;
    TcpSocket::from_std_stream(socket)
        .connect(addr)
        .await
        .map_err(|source| StreamError::Connect { addr, source })
}

/// Why [`connect_stream`] made no connection.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
}

fn new_socket(domain: Domain) -> io::Result<std::net::TcpStream> {
    let socket = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_linger(Some(Duration::ZERO))?;
    Ok(socket.into())
}

async fn connect(
    socket: std::net::TcpStream,
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Failure> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(Failure::TimedOut(timeout));
    }
    let socket = TcpSocket::from_std_stream(socket);
    match tokio::time::timeout(remaining, socket.connect(addr)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused => Err(Failure::Refused),
        Ok(Err(error)) => Err(Failure::Other(error.to_string())),
        Err(_) => Err(Failure::TimedOut(timeout)),
    }
}
