//! Integration tests of evgrid-ingest: the real service on a real nats-server per test, driven
//! over real HTTP, every answer checked against docs/openapi.yaml.

mod auth;
mod config;
mod fuzz;
mod helpers;
mod lifecycle;
mod openapi;
mod post;
mod reads;
mod slow_clients;
