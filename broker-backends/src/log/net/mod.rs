//! The network layer of the built-in broker, on top of `storage`: the socket protocol, the server
//! that serves an open store over it, and the client that reaches a store through its server.
//!
//! - [`wire`]: the frame codec and the request kinds;
//! - [`server`]: serving a store on the directory's unix socket and over TCP/TLS (`broker serve`),
//!   within [`ServerLimits`];
//! - [`remote`]: the client ([`remote::RemoteStore`], its consumers and stream members), and the
//!   takeover of a directory whose owner is gone;
//! - [`tls`]: rustls on both sides.
//!
//! This layer uses `storage` (the server answers from a `LogStore`; the takeover opens one); the
//! storage never uses it.

pub(crate) mod remote;
pub(crate) mod server;
pub(crate) mod tls;
pub(crate) mod wire;

pub(crate) use server::socket_path;
pub use server::{serve_tcp, serve_tcp_with, ServerLimits};
pub use tls::ServerTls;
