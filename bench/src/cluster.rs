//! The 3-node RabbitMQ cluster of `tests/cluster/rabbitmq-cluster.sh`, for the quorum figure: started in a
//! directory of its own, stopped (by the pids the script recorded) at the end or when dropped.

use std::path::PathBuf;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/cluster/rabbitmq-cluster.sh");

pub struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    pub async fn start() -> anyhow::Result<Self> {
        let cluster = Self { dir: std::env::temp_dir().join(format!("bench-rabbitmq-cluster-{}", std::process::id())) };
        eprintln!("starting a 3-node RabbitMQ cluster ({SCRIPT})");
        cluster.run("start").await?;
        Ok(cluster)
    }

    pub async fn urls(&self) -> anyhow::Result<String> {
        self.run("urls").await
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.run("stop").await.map(drop)
    }

    async fn run(&self, command: &str) -> anyhow::Result<String> {
        let output = tokio::process::Command::new("bash")
            .arg(SCRIPT)
            .arg(command)
            .env("RABBITMQ_CLUSTER_DIR", &self.dir)
            .output()
            .await?;
        anyhow::ensure!(
            output.status.success(),
            "rabbitmq-cluster.sh {command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = std::process::Command::new("bash")
                .arg(SCRIPT)
                .arg("stop")
                .env("RABBITMQ_CLUSTER_DIR", &self.dir)
                .status();
        }
    }
}
