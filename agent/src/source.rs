//! Where the node's meshed pods come from: the Kubernetes API server ([`kube`]) or a directory of
//! Pod manifests ([`manifests`]).
//!
//! A source publishes the complete set of pods it knows, level-triggered like a Kubernetes
//! informer's store: consumers compare it with what they serve, so a missed or repeated update
//! never leaves them out of step.

pub mod kube;
pub mod manifests;

use std::{collections::BTreeMap, sync::Arc};

use crate::pod::{Pod, PodKey};

/// Every meshed pod a source knows, by key.
pub type PodSet = BTreeMap<PodKey, Arc<Pod>>;
