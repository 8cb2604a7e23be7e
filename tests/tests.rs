//! The integration suite: one test binary (so the server binary is built once), one module per
//! theme. Every test starts the real binary on an ephemeral loopback port with its own redb file.

mod util;

mod api_aliases;
mod api_auth;
mod api_catalog;
mod api_downloads;
mod api_json;
mod api_publish;
mod api_routing;
mod api_uploads;
mod caching;
mod contract;
mod crash;
mod disk;
mod frontdoor;
mod incus;
mod incus_launch;
mod incusd;
mod late_digest;
mod lifecycle;
mod logs;
mod metrics;
mod mirror;
mod nginx_cache;
mod ops;
mod page;
mod push;
mod retention;
mod smoke;
mod storage;
mod streams;
mod upgrade;
mod walkthrough;
