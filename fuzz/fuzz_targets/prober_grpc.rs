//! Arbitrary bytes as what a gRPC app answers the agent's health check with. With the first byte's
//! bit 0 clear, the bytes are the body of the response, through the reader of its gRPC frame and
//! `HealthCheckResponse` (`decode_response`): nothing panics, and a message is read only from
//! exactly one uncompressed frame whose length is the rest of the body. With it set, they are all
//! the app sends on the connection once the call's HEADERS have come (HTTP/2 frames: its SETTINGS,
//! the response's HEADERS, DATA and trailers), through the prober as it runs a pod's gRPC probe
//! (`grpc::probe`, hyper's HTTP/2 client over an in-memory stream): nothing panics, and the verdict
//! is a success only when the app said SERVING. Bit 1 keeps the app's end open after its bytes, so
//! that an answer with no end waits for the probe's timeout.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use probe_bypass::{
    dial::StreamError,
    serve::prober::{
        Connector, Verdict,
        fuzzing::{DecodeError, ServingStatus, decode_response},
        grpc::{GrpcProbe, probe},
    },
};
use tokio::io::DuplexStream;

mod app;

/// The app: every connection gets `answer` once the call has come, and what the prober sends is
/// read and dropped.
struct App {
    answer: Vec<u8>,
    keep_open: bool,
}

impl Connector for App {
    type Stream = DuplexStream;

    async fn connect(&self, _addr: SocketAddr) -> Result<DuplexStream, StreamError> {
        // Like an HTTP/2 server, the app answers once the call's HEADERS have come.
        let (prober, _) = app::connection(self.answer.clone(), self.keep_open, has_headers);
        Ok(prober)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        check_frame(bytes);
        return;
    }
    let app = App {
        answer: bytes.to_vec(),
        keep_open: selector & 2 != 0,
    };
    let grpc = GrpcProbe {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), 9090),
        service: "ready".to_owned(),
        timeout: Duration::from_secs(1),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let outcome = runtime.block_on(probe(&app, &grpc, "kube-probe/1.31"));
    assert_eq!(outcome.status, None, "no HTTP status for gRPC");
    match outcome.verdict {
        Verdict::Success => assert!(outcome.message.ends_with(": SERVING"), "{outcome:?}"),
        Verdict::Failure | Verdict::Timeout => {}
        Verdict::Warning => panic!("a gRPC probe has no warnings: {outcome:?}"),
    }
});

/// Whether the prober's bytes so far hold, after the connection preface, a whole HEADERS frame.
fn has_headers(received: &[u8]) -> bool {
    const PREFACE: usize = 24;
    const HEADERS: u8 = 1;
    let mut frames = received.get(PREFACE..).unwrap_or_default();
    while let Some((&[l0, l1, l2, kind, ..], _)) = frames.split_first_chunk::<9>() {
        let end = 9 + (usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2));
        if frames.len() < end {
            return false;
        }
        if kind == HEADERS {
            return true;
        }
        frames = &frames[end..];
    }
    false
}

fn check_frame(body: &[u8]) {
    let decoded = decode_response(body);
    let Some((&compressed, rest)) = body.split_first() else {
        assert_eq!(decoded, Err(DecodeError::NoMessage));
        return;
    };
    if compressed != 0 {
        assert_eq!(decoded, Err(DecodeError::Compressed));
        return;
    }
    let Some((length, message)) = rest.split_first_chunk::<4>() else {
        assert_eq!(decoded, Err(DecodeError::Truncated));
        return;
    };
    let length = u32::from_be_bytes(*length) as usize;
    if message.len() < length {
        assert_eq!(decoded, Err(DecodeError::Truncated), "a frame cut short");
        return;
    }
    if message.len() > length {
        let trailing = message.len() - length;
        assert_eq!(decoded, Err(DecodeError::TrailingBytes(trailing)));
        return;
    }
    match decoded {
        // A message that is only its status field, as servers send it, reads as that status.
        Ok(status) => {
            if let [0x08, number] = message
                && number & 0x80 == 0
            {
                let expected = match number {
                    0 => ServingStatus::Unknown,
                    1 => ServingStatus::Serving,
                    2 => ServingStatus::NotServing,
                    3 => ServingStatus::ServiceUnknown,
                    other => ServingStatus::Other(u64::from(*other)),
                };
                assert_eq!(status, expected);
            }
        }
        // The message's own fields cut short or of an unknown shape.
        Err(DecodeError::Truncated | DecodeError::Malformed(_)) => {}
        Err(error) => panic!("{error} for a whole frame of {length} bytes"),
    }
}
