//! `partition-consumer`: one instance of a partitioned consumer service, configured by `PC_*` variables (see
//! `integration_tests::partitioned`). SIGTERM stops it gracefully; the partition test SIGKILLs one.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    integration_tests::partitioned::consumer_main().await
}
