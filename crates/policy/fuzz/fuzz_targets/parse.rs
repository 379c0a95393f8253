//! Any bytes, read as UTF-8 (lossy), must parse or be refused with an error, never panic;
//! whatever parses must compile or be refused, never panic.
#![no_main]

use bulkhead_policy::{PolicySet, parse_documents};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(resources) = parse_documents("fuzz.yaml", &text) {
        let _ = PolicySet::compile(&resources, 1);
    }
});
