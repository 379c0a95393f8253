//! JSON Schemas of the policy types, for the Kubernetes CRDs (feature `schema`, used by
//! `crates/kubernetes` only). The structs derive theirs; the value types that read from a
//! string (or a number) say here what they accept. A schema may be looser than the parser
//! (a pattern here is a first filter for `kubectl`), never stricter: the parser decides.
//!
//! This module must never change what a type accepts or how it prints; it only describes.

use crate::located::Located;
use crate::model::Name;
use crate::pattern::{
    GrpcName, HeaderName, HostPattern, IdentityPattern, Method, PathPattern, PortRange,
};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use std::borrow::Cow;

/// A value with its position is, on the wire, just the value.
impl<T: JsonSchema> JsonSchema for Located<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// A string type: inlined, with a description and an optional pattern.
macro_rules! string_schema {
    ($ty:ty, $name:literal, $description:literal $(, $key:literal : $value:expr)*) => {
        impl JsonSchema for $ty {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "description": $description,
                    $($key: $value,)*
                })
            }
        }
    };
}

string_schema!(
    Name,
    "Name",
    "1-63 lowercase letters, digits or '-', starting and ending with a letter or digit",
    "maxLength": 63,
    "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
);
string_schema!(
    IdentityPattern,
    "IdentityPattern",
    "a SPIFFE ID (spiffe://td/ns/shop/sa/orders), a prefix ending in /* (spiffe://td/ns/shop/*), or * for any authenticated caller",
    "pattern": "^(\\*|spiffe://.+)$"
);
string_schema!(
    Method,
    "Method",
    "an HTTP method: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT or TRACE"
);
string_schema!(
    PathPattern,
    "PathPattern",
    "an HTTP path: exact (/charge), a prefix (/orders/*), or a glob (* within a segment, ** for whole segments)",
    "pattern": "^/"
);
string_schema!(
    HostPattern,
    "HostPattern",
    "a host name, exact (shop.example) or with a leading wildcard label (*.shop.example)"
);
string_schema!(HeaderName, "HeaderName", "an HTTP header name");
string_schema!(
    GrpcName,
    "GrpcName",
    "package.Service, or package.Service/Method"
);

/// `8080` or `"9000-9100"`: Kubernetes' int-or-string.
impl JsonSchema for PortRange {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("PortRange")
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "a port (8080) or an inclusive range (\"9000-9100\")",
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}]
        })
    }
}
