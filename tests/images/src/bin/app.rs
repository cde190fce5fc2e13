//! The test app: listens on the ports it is given and answers every HTTP request on them with
//! `200 OK` and `NAME:PORT` (`app A:8080`, as the tests' own apps answer), one thread per
//! connection, until it is stopped.
//!
//! `pb-app NAME PORT...` serves on `0.0.0.0:PORT` for each port. `pb-app --exit CODE` exits at once
//! with that status, for an init container.
//!
//! SIGUSR1 makes it stop listening and stay up, as an app that has hung or lost its listener:
//! what a liveness probe exists to catch.

use std::{
    env,
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    process::ExitCode,
    thread,
};

fn main() -> ExitCode {
    probe_bypass_test_images::exit_on_stop_signals();
    let args: Vec<String> = env::args().skip(1).collect();
    if let [flag, code] = args.as_slice()
        && flag == "--exit"
    {
        return code.parse::<u8>().map_or(ExitCode::FAILURE, ExitCode::from);
    }
    let Some((name, ports)) = args.split_first() else {
        eprintln!("usage: pb-app NAME PORT... | pb-app --exit CODE");
        return ExitCode::from(2);
    };
    let mut servers = Vec::new();
    for port in ports {
        let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("pb-app: cannot listen on port {port}: {error}");
                return ExitCode::FAILURE;
            }
        };
        let body = format!("{name}:{port}");
        probe_bypass_test_images::close_on_sigusr1(&listener);
        servers.push(thread::spawn(move || serve(&listener, &body)));
    }
    eprintln!("pb-app {name}: listening on {}", ports.join(", "));
    for server in servers {
        let _ = server.join();
    }
    eprintln!("pb-app {name}: no longer listening (SIGUSR1); staying up");
    loop {
        thread::park();
    }
}

/// Answers every connection until the listener is shut down.
fn serve(listener: &TcpListener, body: &str) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let body = body.to_owned();
                thread::spawn(move || answer(stream, &body));
            }
            // Shut down by SIGUSR1.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => return,
            Err(_) => {}
        }
    }
}

/// Answers each request of a kept-alive connection, reading its head and ignoring any body (the
/// tests' requests have none).
fn answer(stream: TcpStream, body: &str) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        let mut head_is_empty = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line.trim_end().is_empty() => break,
                Ok(_) => head_is_empty = false,
            }
        }
        if head_is_empty {
            continue;
        }
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}
