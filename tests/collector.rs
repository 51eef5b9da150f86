//! The collector configurations in collector-config/ and the tiers they make:
//! the agent sends each signal where a compose service takes it, the gateway
//! balances by trace to the sampling backends, and the Kubernetes DaemonSet's
//! agent forwards to the gateway's receiver. Every pipeline component is defined
//! and used.
mod support;

use std::collections::BTreeSet;

use support::deploy::{
    Serves,
    collector::{Collector, GATEWAY, GATEWAY_BACKEND, agent_problems, gateway_problems},
    compose::{COLLECTOR, Compose, listening},
    fail_on, read_yaml_documents,
};

#[test]
fn the_agent_sends_each_signal_where_a_service_takes_it() {
    let compose = Compose::load();
    assert_eq!(
        compose.config_file(COLLECTOR, "--config"),
        "collector-config/agent.yaml"
    );
    fail_on(agent_problems(&compose.collector(), &listening(&compose)));
}

#[test]
fn the_gateway_balances_by_trace_to_the_sampling_backends() {
    let compose = Compose::load();
    fail_on(gateway_problems(
        &Collector::load(GATEWAY),
        &Collector::load(GATEWAY_BACKEND),
        &listening(&compose),
    ));
}

/// The Kubernetes DaemonSet's agent collector forwards to the gateway tier: to
/// the port gateway.yaml takes that protocol on, and each signal it forwards has
/// a pipeline there.
#[test]
fn the_kubernetes_agent_forwards_to_the_gateways_receiver() {
    const MANIFEST: &str = "deploy/kubernetes/otel-tcpstates.yaml";
    let agents: Vec<Collector> = read_yaml_documents(MANIFEST)
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .flat_map(|d| d["data"].as_object().cloned().unwrap_or_default())
        .map(|(key, text)| {
            let text = text.as_str().expect("ConfigMap data is text");
            Collector::parse(&format!("{MANIFEST} ConfigMap {key}"), text)
        })
        .collect();
    assert!(!agents.is_empty(), "{MANIFEST}: no collector configuration");
    let gateway = Collector::load(GATEWAY);
    let receivers = gateway.listeners();
    let signal = |pipeline: &str| pipeline.split('/').next().unwrap_or(pipeline).to_owned();
    let gateway_signals: BTreeSet<String> = gateway
        .pipelines()
        .iter()
        .map(|p| signal(&p.name))
        .collect();
    let mut forwarded = BTreeSet::new();
    for agent in &agents {
        for pipeline in agent.pipelines() {
            for id in &pipeline.exporters {
                let (endpoint, protocol) =
                    agent.exporter_target(id).unwrap_or_else(|e| panic!("{e}"));
                if !endpoint.host.starts_with("otel-gateway.") {
                    continue;
                }
                assert!(
                    receivers
                        .iter()
                        .any(|l| l.port == endpoint.port && l.serves == Serves::Otlp(protocol)),
                    "{}: {id} sends {protocol:?} to port {}; {GATEWAY} listens for {receivers:?}",
                    agent.file,
                    endpoint.port
                );
                forwarded.insert(signal(&pipeline.name));
            }
        }
    }
    assert!(
        !forwarded.is_empty(),
        "{MANIFEST}: nothing goes to otel-gateway.*"
    );
    assert!(
        forwarded.is_subset(&gateway_signals),
        "{MANIFEST} forwards {forwarded:?}; {GATEWAY} has pipelines for {gateway_signals:?}"
    );
}
