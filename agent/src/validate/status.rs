//! Which agent serves this pod, asked of the healthcheck listener in the pod
//! (`GET /probe-bypass-status`), and what a user should check when the check fails.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::serve::healthcheck::status::{STATUS_PATH, field};

/// Bound on the whole question.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest answer read.
const MAX_ANSWER: usize = 16 * 1024;

/// What the agent said of itself and of this pod.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub node: Option<String>,
    pub agent_pod: Option<String>,
    pub datapath: String,
    pub pod: String,
    pub in_datapath: bool,
}

/// The agent's status as seen from the pod.
#[derive(Debug)]
pub enum Status {
    Answered(Answer),
    /// Nothing listens on the healthcheck port: no agent serves this pod (yet).
    NoAgent(String),
    /// Something listens but gave no readable answer.
    Unreadable(String),
}

/// Asks the healthcheck listener on loopback (of the pod IP's family) in this pod.
pub fn ask(pod_ip: IpAddr, port: u16) -> Status {
    let loopback: IpAddr = if pod_ip.is_ipv4() {
        Ipv4Addr::LOCALHOST.into()
    } else {
        Ipv6Addr::LOCALHOST.into()
    };
    let addr = SocketAddr::new(loopback, port);
    let deadline = Instant::now() + ASK_TIMEOUT;
    let mut stream = match TcpStream::connect_timeout(&addr, ASK_TIMEOUT) {
        Ok(stream) => stream,
        Err(error) => return Status::NoAgent(format!("nothing answers on {addr}: {error}")),
    };
    match exchange(&mut stream, deadline).and_then(|body| parse(&body)) {
        Ok(answer) => Status::Answered(answer),
        Err(error) => Status::Unreadable(format!("{addr} {STATUS_PATH}: {error}")),
    }
}

/// Sends the request and reads the body of a 200 answer; the agent keeps the connection open a
/// while after answering, so the answer ends at its Content-Length, not at a close.
fn exchange(stream: &mut TcpStream, deadline: Instant) -> Result<String, String> {
    let request =
        format!("GET {STATUS_PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        if let Some(body) = complete_body(&got)? {
            return Ok(body);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || got.len() > MAX_ANSWER {
            return Err("no complete answer in time".to_owned());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => return Err("the connection closed before a complete answer".to_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(error) => return Err(format!("reading the answer: {error}")),
        }
    }
}

/// The body once the whole answer is in; an error for an answer other than 200.
fn complete_body(got: &[u8]) -> Result<Option<String>, String> {
    let Some(head_end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&got[..head_end]);
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!(
            "answered {} (an agent older than this check?)",
            head.lines().next().unwrap_or("")
        ));
    }
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .ok_or("an answer without Content-Length")?;
    let body = &got[head_end + 4..];
    Ok((body.len() >= length).then(|| String::from_utf8_lossy(&body[..length]).into_owned()))
}

fn parse(body: &str) -> Result<Answer, String> {
    let value: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    let text = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
    Ok(Answer {
        node: text(field::NODE),
        agent_pod: text(field::AGENT_POD),
        datapath: text(field::DATAPATH).ok_or("no datapath mode in the answer")?,
        pod: text(field::POD).unwrap_or_default(),
        in_datapath: value
            .get(field::IN_DATAPATH)
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// What the pod and node are called in the messages.
pub struct Names<'a> {
    pub pod: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
}

/// What to check, given what the agent said.
pub fn advice(status: &Status, names: &Names<'_>, outbound_port: u16) -> String {
    let Names {
        pod,
        namespace,
        name,
        node,
    } = names;
    let commands = format!(
        "Check the agent:\n  kubectl -n probe-bypass get pods -o wide --field-selector \
         spec.nodeName={node}\n  kubectl -n probe-bypass logs <that pod> | grep {pod}\nand its \
         metric probe_bypass_datapath_pod{{namespace=\"{namespace}\",pod=\"{name}\"}} (on its \
         admin port, 9091, /metrics): 1 once the pod is in the datapath."
    );
    match status {
        Status::NoAgent(why) => format!(
            "No probe-bypass agent serves this pod ({why}): the DaemonSet probe-bypass on node \
             {node} is not running, or has not served this pod yet. {commands}"
        ),
        Status::Unreadable(why) => {
            format!("The agent's status could not be read ({why}). {commands}")
        }
        Status::Answered(answer) => {
            let agent = match (&answer.agent_pod, &answer.node) {
                (Some(agent), Some(at)) => format!("The agent {agent} on node {at}"),
                (Some(agent), None) => format!("The agent {agent}"),
                (None, Some(at)) => format!("The agent on node {at}"),
                (None, None) => "The agent".to_owned(),
            };
            let stranger = if answer.pod.is_empty() || answer.pod == *pod {
                String::new()
            } else {
                format!(
                    " (it knows this pod as {}, not {pod}: check POD_NAME and POD_NAMESPACE)",
                    answer.pod
                )
            };
            if answer.datapath != "ebpf" {
                return format!(
                    "{agent} serves this pod{stranger} with the datapath mode {}: it runs without \
                     the eBPF datapath, so nothing replaces the mesh's iptables rules that were \
                     taken out of this pod. Set PROBE_BYPASS_DATAPATH=ebpf on the DaemonSet \
                     probe-bypass, or turn replacement off (the webhook's \
                     PROBE_BYPASS_WEBHOOK_REPLACE_MESH_INIT=false) and recreate the pod so that \
                     the mesh's own init container comes back.",
                    answer.datapath
                );
            }
            let agent_log = answer.agent_pod.as_deref().unwrap_or("<that pod>");
            format!(
                "{agent} has this pod in its eBPF datapath{stranger} (datapath mode ebpf), yet \
                 the connection was not sent to the outbound port {outbound_port}. Check the \
                 pod's outbound exclusions (the outbound-ip-range-exclusion-list, \
                 outbound-ip-range-inclusion-list and outbound-port-exclusion-list annotations: \
                 the check connects into its --target-range, by default 192.0.2.0/24 or \
                 2001:db8::/32, on a port of 20000-31999), \
                 that the agent's --cgroup-root holds this pod's cgroup, and the agent's log: \
                 kubectl -n probe-bypass logs {agent_log}"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_agents_answer_and_waits_for_its_whole_body() {
        let body = r#"{"node":"n1","agent_pod":"probe-bypass-x","datapath":"ebpf","pod":"shop/a","in_datapath":true}"#;
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        let whole = format!("{head}{body}");
        assert_eq!(
            complete_body(&whole.as_bytes()[..whole.len() - 1]),
            Ok(None)
        );
        let read = complete_body(whole.as_bytes())
            .expect("200")
            .expect("whole");
        assert_eq!(
            parse(&read),
            Ok(Answer {
                node: Some("n1".into()),
                agent_pod: Some("probe-bypass-x".into()),
                datapath: "ebpf".into(),
                pod: "shop/a".into(),
                in_datapath: true,
            })
        );
        let not_found = "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno";
        assert!(complete_body(not_found.as_bytes()).is_err());
    }

    #[test]
    fn the_advice_names_the_node_the_agent_and_what_to_do() {
        let names = Names {
            pod: "shop/a",
            namespace: "shop",
            name: "a",
            node: "n1",
        };
        let none = advice(&Status::NoAgent("refused".into()), &names, 15001);
        assert!(none.contains("DaemonSet probe-bypass on node n1"), "{none}");
        assert!(none.contains("spec.nodeName=n1"), "{none}");
        assert!(none.contains("probe_bypass_datapath_pod"), "{none}");
        let off = Status::Answered(Answer {
            node: Some("n1".into()),
            agent_pod: Some("probe-bypass-x".into()),
            datapath: "none".into(),
            pod: "shop/a".into(),
            in_datapath: false,
        });
        let off = advice(&off, &names, 15001);
        assert!(off.contains("probe-bypass-x on node n1"), "{off}");
        assert!(off.contains("PROBE_BYPASS_DATAPATH=ebpf"), "{off}");
    }
}
