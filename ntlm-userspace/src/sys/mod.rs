//! The system-call layer: every wrapper around libc that the engines, the parker, `doctor`
//! and `main` use lives here, each in the file of its concern, with its SAFETY argument
//! written once. Socket options go through `socket2` where it has them.
//!
//! Nothing here knows about connections or engines; the engine-specific kernel reads of the
//! sockmap engine (TCP_INFO layout, cookies, queue sizes) are built on [`sock`] in
//! `engine/sockmap/sock.rs`.

pub mod caps;
pub mod clock;
pub mod epoll;
pub mod fdpass;
pub mod mem;
pub mod netlink;
pub mod pipe;
pub mod privs;
pub mod rlimit;
pub mod sock;
