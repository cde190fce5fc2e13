//! The app at the far end of the prober's connections, for the prober's fuzz targets: an in-memory
//! stream that answers with the fuzzer's bytes once the prober's request has come, as a server does.

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream},
    task::JoinHandle,
};

/// A new connection: the prober's end, and the task of the app's end, which waits until the
/// prober's bytes so far hold its request (`has_request`), sends `answer`, then closes its side
/// (unless `keep_open`: then it never does), and returns all the prober sent once the prober has
/// closed.
pub fn connection(
    answer: Vec<u8>,
    keep_open: bool,
    has_request: fn(&[u8]) -> bool,
) -> (DuplexStream, JoinHandle<Vec<u8>>) {
    let (prober, app) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(async move {
        let (mut reader, mut writer) = tokio::io::split(app);
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        while !has_request(&received) {
            match reader.read(&mut buffer).await {
                Ok(n) if n > 0 => received.extend_from_slice(&buffer[..n]),
                _ => return received,
            }
        }
        let answer = async move {
            // The prober may close before it has read everything.
            let _ = writer.write_all(&answer).await;
            if keep_open {
                std::future::pending::<()>().await;
            }
            let _ = writer.shutdown().await;
        };
        {
            let mut read = std::pin::pin!(reader.read_to_end(&mut received));
            tokio::select! {
                () = answer => {
                    let _ = read.await;
                }
                _ = &mut read => {}
            }
        }
        received
    });
    (prober, served)
}
