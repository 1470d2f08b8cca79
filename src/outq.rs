//! What a socket's peer has not taken yet of what was written to it (SIOCOUTQ): over TCP, the
//! bytes not yet acknowledged or not yet sent; over a Unix stream socket, the bytes the peer has
//! not read. The proxy and the Docker socket read it to tell a client that takes its answer
//! slowly from one that takes nothing.

/// Bytes written to the socket `fd` that its peer has not taken yet, if it can be read. `fd`
/// must be the caller's own open socket.
pub(crate) fn queued(fd: i32) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for sockets) writes one int; `fd` is the caller's own socket,
    // open while it calls this.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    (r == 0 && queued >= 0).then_some(queued as u64)
}
