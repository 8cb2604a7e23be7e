//! imgsrv: stores, publishes and serves VM and disk images from one redb database.
//!
//! The README's ARCHITECTURE section is the map of these modules and their invariants.

pub mod admin;
pub mod api;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod error;
pub mod frontdoor;
pub mod hop;
pub mod http;
pub mod jobs;
pub mod log;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod pace;
pub mod page;
pub mod scrub;
pub mod server;
pub mod store;
pub mod streams;
pub mod systemd;
pub mod validate;
