//! Where workloads are: the address → workload table a transparent sidecar routes by.
//!
//! A connection captured on its way out names only an IP and a port. If a Workload declares
//! that address, the destination is in the mesh: the connection goes over mTLS and the server
//! must present that workload's identity. Any other address is outside the mesh.

use crate::model::{Resource, WorkloadRef};
use crate::pattern::Protocol;
use core::net::IpAddr;
use std::collections::HashMap;

/// A workload reachable at an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub workload: WorkloadRef,
    /// The exact SPIFFE ID its sidecar must present.
    pub identity: String,
    /// Declared ports and their protocols.
    pub ports: Vec<(u16, Protocol)>,
}

impl Endpoint {
    pub fn protocol(&self, port: u16) -> Option<Protocol> {
        self.ports.iter().find(|(p, _)| *p == port).map(|(_, x)| *x)
    }
}

/// Every declared address of the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    by_ip: HashMap<IpAddr, Endpoint>,
}

impl Endpoints {
    /// Collects the addresses of every Workload with an exact identity. The compiler refuses
    /// an address declared twice; should one arrive anyway, the first declaration wins.
    pub fn from_resources(resources: &[Resource]) -> Endpoints {
        let mut e = Endpoints::default();
        for r in resources {
            let Resource::Workload(doc) = r else { continue };
            let Some(identity) = doc.spec.exact_identity() else {
                continue;
            };
            let endpoint = Endpoint {
                workload: r.name(),
                identity: identity.to_string(),
                ports: doc.spec.port_protocols(),
            };
            for a in &doc.spec.addresses {
                e.by_ip.entry(a.value).or_insert_with(|| endpoint.clone());
            }
        }
        e
    }

    pub fn insert(&mut self, ip: IpAddr, endpoint: Endpoint) {
        self.by_ip.insert(ip, endpoint);
    }

    pub fn get(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.by_ip.get(&ip)
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Endpoint)> {
        self.by_ip.iter()
    }
}
