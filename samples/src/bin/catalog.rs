//! The catalog service as its own process. Configuration by environment: `DATABASE_URL` (`postgres://…` or
//! `sqlite://…`), `AMQP_URL`, `HTTP_ADDR`, `RUST_LOG`; see the README.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    samples::service_main(samples::Service::Catalog).await
}
