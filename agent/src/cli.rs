//! The command line.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    healthcheck::TcpTarget,
    ports::{DEFAULT_ADMIN_ADDR, HEALTHCHECK_PORT},
};

/// Lets kubelet health probes past a service mesh's sidecar, for every meshed pod on the node.
#[derive(Debug, Parser)]
#[command(name = "probe-bypass", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the healthcheck for every meshed pod on this node.
    Run(RunArgs),
}

#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Directory of Pod manifests (YAML or JSON), one pod per file, each with `status.podIP` and
    /// the annotation `probe-bypass/netns` (a name under /run/netns or an absolute path).
    /// Files added, changed and removed while the agent runs are picked up.
    #[arg(long, value_name = "DIR", env = "PROBE_BYPASS_POD_MANIFESTS")]
    pub pod_manifests: PathBuf,

    /// Address of the admin endpoints (/health/alive, /health/ready, /metrics), in the host network
    /// namespace.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN_ADDR, env = "PROBE_BYPASS_ADMIN_ADDR")]
    pub admin_addr: SocketAddr,

    /// Port of the healthcheck listener inside each pod.
    #[arg(long, value_name = "PORT", default_value_t = HEALTHCHECK_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub healthcheck_port: u16,

    /// Dial any port a request names, not only the ports the pod's probes name. This is FSM's and
    /// OSM's behaviour; it lets anyone who reaches the healthcheck probe every port of the pod.
    #[arg(long)]
    pub allow_any_port: bool,

    /// Which address of the pod a probe connects to.
    #[arg(long, value_enum, default_value_t = TcpTarget::PodIp)]
    pub tcp_target: TcpTarget,

    /// Bound on the connect a probe makes (for example 500ms, 2s).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = positive_duration)]
    pub dial_timeout: Duration,

    /// Bound on reading a request's head; a slower client is disconnected.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = positive_duration)]
    pub header_read_timeout: Duration,
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be more than zero".to_owned());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["probe-bypass", "run", "--pod-manifests", "/pods"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Run(args) => args,
        })
    }

    #[test]
    fn defaults_match_the_mesh() {
        let args = parse(&[]).expect("defaults parse");
        assert_eq!(args.healthcheck_port, 15904);
        assert_eq!(args.admin_addr.to_string(), "0.0.0.0:9091");
        assert_eq!(args.tcp_target, TcpTarget::PodIp);
        assert_eq!(args.dial_timeout, Duration::from_secs(1));
        assert!(!args.allow_any_port);
    }

    #[test]
    fn odd_values_are_refused() {
        assert!(parse(&["--dial-timeout", "0s"]).is_err());
        assert!(parse(&["--dial-timeout", "soon"]).is_err());
        assert!(parse(&["--healthcheck-port", "0"]).is_err());
        assert!(parse(&["--tcp-target", "everywhere"]).is_err());
        assert_eq!(
            parse(&["--tcp-target", "either", "--dial-timeout", "250ms"])
                .map(|a| (a.tcp_target, a.dial_timeout))
                .expect("valid"),
            (TcpTarget::Either, Duration::from_millis(250))
        );
    }
}
