//! Arbitrary bytes as the text of a file in the `--pod-manifests` directory, through the manifests
//! source's parser (`manifests::parse`: YAML or JSON, then the agent's view of the Pod): nothing
//! panics; a file that is not UTF-8 is not read (the source reads text); a pod read names no port
//! 0 among its probes' ports; and the document read, written back as JSON (what a `.json` file
//! holds), reads as the same pod with the same warnings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use probe_bypass::source::manifests::parse;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = parse(text) else {
        return;
    };
    let pod = &parsed.pod;
    assert!(!pod.probe_ports.contains(&0), "{pod:?}");
    assert!(!pod.other_ips.contains(&pod.ip), "{pod:?}");
    let document: Value = serde_norway::from_str(text).expect("read once, reads again");
    let json = serde_json::to_string(&document).expect("a document writes as JSON");
    let again = parse(&json).unwrap_or_else(|error| panic!("{json} does not read back: {error}"));
    assert_eq!(&again.pod, pod, "{json}");
    assert_eq!(again.warnings, parsed.warnings, "{json}");
});
