//! Whatever parses must print back (YAML and JSON) to text that parses to the same resource.
//! Stricter than `parse`: a difference is a crash here.
#![no_main]

use bulkhead_policy::model::Resource;
use bulkhead_policy::parse_documents;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(resources) = parse_documents("fuzz.yaml", &text) else {
        return;
    };
    for r in resources {
        let yaml = r.to_yaml().unwrap_or_else(|e| panic!("a parsed resource does not print: {e}"));
        match parse_documents("printed.yaml", &yaml) {
            Ok(back) => assert_eq!(
                back,
                vec![r.clone()],
                "YAML round trip changed the resource:\n{yaml}"
            ),
            Err(e) => panic!("printed YAML does not parse: {e}\n{yaml}"),
        }
        let json = r.to_json().unwrap_or_else(|e| panic!("a parsed resource does not serialize: {e}"));
        match Resource::from_json(&json) {
            Ok(back) => assert_eq!(back, r, "JSON round trip changed the resource: {json}"),
            Err(e) => panic!("printed JSON does not parse: {e}\n{json}"),
        }
    }
});
