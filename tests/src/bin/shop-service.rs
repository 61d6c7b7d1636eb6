//! `shop-service catalog|ordering`: the sample services, configured by the environment exactly like the
//! `catalog` and `ordering` binaries, for the fault suite. Built with the outbox's `failpoints` feature:
//! `BUS_FAILPOINT=relay-after-confirm@N` aborts the process at that point.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let service = match std::env::args().nth(1).as_deref() {
        Some("catalog") => samples::Service::Catalog,
        Some("ordering") => samples::Service::Ordering,
        _ => {
            eprintln!("usage: shop-service catalog|ordering");
            return std::process::ExitCode::from(2);
        }
    };
    samples::service_main(service).await
}
