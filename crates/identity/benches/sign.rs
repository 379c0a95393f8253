//! What the CA costs per workload certificate: verifying a CSR and signing an X.509-SVID
//! (P-256, aws-lc-rs), single-threaded. The target is over 2,000 signatures per second per
//! core, i.e. under 500 µs each.
//!
//! cargo bench -p bulkhead-identity --bench sign

use bulkhead_identity::{Ca, LocalKey, SpiffeId};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::{Duration, SystemTime};

fn sign(c: &mut Criterion) {
    let now = SystemTime::now();
    let ca = Ca::generate("bench.local", now).expect("CA");
    let id = SpiffeId::parse("spiffe://bench.local/ns/shop/sa/orders").expect("ID");
    let csr = LocalKey::generate()
        .expect("key")
        .csr_der(Some(&id))
        .expect("CSR");
    c.bench_function("sign_csr (verify CSR + sign SVID)", |b| {
        b.iter(|| {
            black_box(
                ca.sign_csr(black_box(&csr), &id, Duration::from_secs(3600), now)
                    .expect("signed"),
            )
        })
    });
    // What a proxy does per renewal on its side: a new key and its CSR.
    c.bench_function("new key + CSR (proxy side)", |b| {
        b.iter(|| {
            black_box(
                LocalKey::generate()
                    .expect("key")
                    .csr_der(Some(&id))
                    .expect("CSR"),
            )
        })
    });
}

criterion_group!(benches, sign);
criterion_main!(benches);
