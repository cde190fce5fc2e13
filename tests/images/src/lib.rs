//! What the test images' programs share: leaving at once on the signals a runtime stops a
//! container with.
//!
//! A container's first process is PID 1 of its PID namespace, and the kernel delivers it no
//! signal whose action is the default: SIGTERM would be ignored and every stop would wait for the
//! runtime's SIGKILL. So both programs install handlers.

/// Makes SIGTERM and SIGINT end the process with status 0, and reaps children as they exit.
pub fn exit_on_stop_signals() {
    // SAFETY: the handlers call only async-signal-safe functions (`_exit`, `waitpid`), and
    // `sigaction` is given a zeroed, then filled, `struct sigaction`.
    unsafe {
        let handlers: [(libc::c_int, extern "C" fn(libc::c_int)); 3] = [
            (libc::SIGTERM, on_stop),
            (libc::SIGINT, on_stop),
            (libc::SIGCHLD, on_child),
        ];
        for (signal, handler) in handlers {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut());
        }
    }
}

extern "C" fn on_stop(_: libc::c_int) {
    // SAFETY: `_exit` is async-signal-safe and ends the process without running anything else.
    unsafe { libc::_exit(0) }
}

extern "C" fn on_child(_: libc::c_int) {
    // SAFETY: `waitpid` is async-signal-safe; WNOHANG returns at once when no child has exited.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

/// The listening sockets SIGUSR1 shuts down (see [`close_on_sigusr1`]); -1 is a free slot.
static LISTENERS: [std::sync::atomic::AtomicI32; 16] =
    [const { std::sync::atomic::AtomicI32::new(-1) }; 16];

/// Makes SIGUSR1 shut `listener` down: it stops accepting, and a thread blocked in `accept`
/// returns `EINVAL`, as if the app had lost its listener. The process stays up.
pub fn close_on_sigusr1(listener: &std::net::TcpListener) {
    use std::{os::fd::AsRawFd as _, sync::atomic::Ordering};
    let fd = listener.as_raw_fd();
    let held = LISTENERS.iter().any(|slot| {
        slot.compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    });
    assert!(held, "more listeners than SIGUSR1 can shut down");
    // SAFETY: the handler calls only `shutdown`, which is async-signal-safe, and `sigaction` is
    // given a zeroed, then filled, `struct sigaction`.
    unsafe {
        let handler: extern "C" fn(libc::c_int) = on_usr1;
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut action.sa_mask);
        libc::sigaction(libc::SIGUSR1, &raw const action, std::ptr::null_mut());
    }
}

extern "C" fn on_usr1(_: libc::c_int) {
    for slot in &LISTENERS {
        let fd = slot.load(std::sync::atomic::Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: `shutdown` is async-signal-safe; the fd is a listening socket still open.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}
