#![recursion_limit = "256"]
//! Integration tests: the built `regobox` binary against a real PostgreSQL server, receiving
//! real signals. All of them compile into this one test binary with shared helpers.

mod support;

mod adopt;
mod backup;
mod config_cli;
mod docker;
mod docker_attacks;
mod docker_decode;
mod image;
mod postgres_embedded;
mod postgres_external;
mod proxy;
mod proxy_hostile;
mod supervisor;
mod upgrade;
mod volume;
