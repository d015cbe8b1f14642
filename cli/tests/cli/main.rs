//! Integration tests of the `evgrid` command line and of the whole pipeline: `evgrid load`
//! against stand-ins and against the live pipeline, the pipeline end to end (HTTP and raw NATS
//! requests to `completed`), `evgrid replay` of what a live grid recorded, and `evgrid up`. One test binary, so the crate links once.

mod agreement;
mod e2e;
mod helpers;
mod load;
mod load_live;
mod nats_client;
mod observability;
mod pipeline;
mod quickstart;
mod replay;
mod secured;
mod up;
