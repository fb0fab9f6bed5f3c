//! Host input for the consoles (the UART and virtio-console): stdin, made pollable.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};

use event_manager::EventSet;

/// What host input is read from (stdin in practice, a pipe in tests).
pub trait HostInput: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> HostInput for T {}

/// Stdin as console input. Regular files and /dev/null cannot be watched with epoll, so
/// those are forwarded through a pipe by a small thread; terminals and pipes are used as is.
pub fn stdin_input() -> io::Result<Box<dyn HostInput>> {
    let stdin = io::stdin();
    if is_pollable(stdin.as_raw_fd()) {
        return Ok(Box::new(stdin));
    }
    let (reader, mut writer) = io::pipe()?;
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Stdin);
            // Ends at EOF (closing the pipe, which the handler sees as EOF) or when the VMM
            // exits; the pipe's capacity gives back-pressure while the guest is slow.
            let _ = io::copy(&mut io::stdin().lock(), &mut writer);
        })?;
    Ok(Box::new(reader))
}

fn is_pollable(fd: RawFd) -> bool {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
    let Ok(epoll) = Epoll::new() else {
        return false;
    };
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_are_pollable_regular_files_are_not() {
        let (r, _w) = std::io::pipe().unwrap();
        assert!(is_pollable(r.as_raw_fd()));
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        assert!(!is_pollable(f.as_file().as_raw_fd()));
    }
}
