//! Avro messages (Kafka `format = 'avro'`): each message is one datum of the source's writer
//! schema (given with the source), framed one of three ways:
//!
//! - `bare`: the datum's bytes alone;
//! - `confluent`: the Confluent wire format, a zero magic byte and a 4-byte schema id before the
//!   datum (the id is checked against `schema_id` when the source names one; there is no
//!   registry lookup: the source's schema is the writer schema);
//! - `single_object`: Avro single-object encoding, `C3 01` and the schema's 8-byte Rabin
//!   fingerprint (checked) before the datum.
//!
//! S3 objects in the Avro object container format (`format = 'avro'` on an S3 source) carry
//! their writer schema; they are read block by block, never whole (codecs null, deflate and
//! snappy).
//!
//! A datum becomes a document field by field: records and maps are objects, unions their
//! branch, enums and UUIDs strings, bytes and fixed base64 text, dates `YYYY-MM-DD`, times
//! `HH:MM:SS.ffffff`, timestamps RFC 3339 (UTC ones with `Z`), decimals numbers when they have
//! at most 15 significant digits and exact decimal text otherwise, durations objects. Bytes
//! left after the datum, a wrong framing or fingerprint, and NaN or infinite floats (JSON has
//! none) are errors: the record goes to the source's error collection.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value as Avro;
use basalt_common::api::AvroFraming;
use basalt_common::doc::Doc;
use basalt_common::{BasaltError, Result};
use base64::Engine;
use serde_json::{Number, Value};

/// Decodes the messages of one Avro source.
pub struct AvroDecoder {
    schema: Schema,
    names: HashMap<Name, Schema>,
    framing: AvroFraming,
    schema_id: Option<u32>,
    /// `C3 01` and the schema's Rabin fingerprint, as Avro's single-object writers put it.
    single_object_header: Vec<u8>,
}

fn invalid(msg: impl std::fmt::Display) -> BasaltError {
    BasaltError::invalid(format!("avro: {msg}"))
}

impl AvroDecoder {
    pub fn new(schema: &str, framing: AvroFraming, schema_id: Option<u32>) -> Result<Self> {
        let schema = basalt_sql::parse_avro_schema(schema)?;
        Self::from_schema(schema, framing, schema_id)
    }

    /// A decoder of values of `schema` (an object container file's writer schema).
    pub fn from_schema(schema: Schema, framing: AvroFraming, schema_id: Option<u32>) -> Result<Self> {
        let names = ResolvedSchema::try_from(&schema)
            .map_err(|e| invalid(format!("bad schema: {e}")))?
            .get_names()
            .iter()
            .map(|(name, s)| (name.clone(), (*s).clone()))
            .collect();
        let single_object_header = RabinFingerprintHeader::from_schema(&schema).build_header();
        Ok(Self { schema, names, framing, schema_id, single_object_header })
    }

    /// One message as a document.
    pub fn decode(&self, payload: &[u8]) -> Result<Doc> {
        let mut datum = match self.framing {
            AvroFraming::Bare => payload,
            AvroFraming::Confluent => {
                let [0, a, b, c, d, rest @ ..] = payload else {
                    return Err(invalid("not in the Confluent wire format (a zero byte and a 4-byte schema id)"));
                };
                let id = u32::from_be_bytes([*a, *b, *c, *d]);
                if let Some(want) = self.schema_id
                    && id != want
                {
                    return Err(invalid(format!("message has schema id {id}, the source reads schema id {want}")));
                }
                rest
            }
            AvroFraming::SingleObject => {
                let [0xC3, 0x01, ..] = payload else {
                    return Err(invalid("not in Avro single-object encoding (C3 01 header)"));
                };
                let header = self.single_object_header.len();
                let (Some(fp), Some(rest)) = (payload.get(..header), payload.get(header..)) else {
                    return Err(invalid("single-object message shorter than its header"));
                };
                if fp != self.single_object_header.as_slice() {
                    return Err(invalid("message written with another schema (fingerprint differs)"));
                }
                rest
            }
        };
        let value = apache_avro::from_avro_datum(&self.schema, &mut datum, None).map_err(invalid)?;
        if !datum.is_empty() {
            return Err(invalid(format!("{} bytes after the datum", datum.len())));
        }
        self.document(value)
    }

    /// A decoded value of the schema as a document.
    pub fn document(&self, value: Avro) -> Result<Doc> {
        match self.to_json(value, &self.schema)? {
            Value::Object(doc) => Ok(doc),
            _ => Err(invalid("datum is not a record")),
        }
    }

    /// The schema a reference names (or the schema itself).
    fn resolve<'a>(&'a self, schema: &'a Schema) -> &'a Schema {
        match schema {
            Schema::Ref { name } => self.names.get(name).unwrap_or(schema),
            _ => schema,
        }
    }

    fn to_json(&self, value: Avro, schema: &Schema) -> Result<Value> {
        let schema = self.resolve(schema);
        Ok(match value {
            Avro::Null => Value::Null,
            Avro::Boolean(b) => Value::Bool(b),
            Avro::Int(i) => Value::from(i),
            Avro::Long(l) => Value::from(l),
            Avro::Float(f) => float(f64::from(f))?,
            Avro::Double(d) => float(d)?,
            Avro::Bytes(b) | Avro::Fixed(_, b) => match schema {
                Schema::Decimal(d) => decimal(&b, d.scale)?,
                _ => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
            },
            Avro::String(s) => Value::String(s),
            Avro::Enum(_, s) => Value::String(s),
            Avro::Uuid(u) => Value::String(u.to_string()),
            Avro::Union(i, inner) => {
                let branch = match schema {
                    Schema::Union(u) => u.variants().get(i as usize).unwrap_or(schema),
                    _ => schema,
                };
                self.to_json(*inner, branch)?
            }
            Avro::Array(items) => {
                let item = match schema {
                    Schema::Array(a) => a.items.as_ref(),
                    _ => schema,
                };
                Value::Array(items.into_iter().map(|v| self.to_json(v, item)).collect::<Result<_>>()?)
            }
            Avro::Map(entries) => {
                let item = match schema {
                    Schema::Map(m) => m.types.as_ref(),
                    _ => schema,
                };
                let mut out = serde_json::Map::new();
                for (k, v) in entries {
                    out.insert(k, self.to_json(v, item)?);
                }
                Value::Object(out)
            }
            Avro::Record(fields) => {
                let mut out = serde_json::Map::new();
                for (i, (k, v)) in fields.into_iter().enumerate() {
                    let field_schema = match schema {
                        Schema::Record(r) => r.fields.get(i).map(|f| &f.schema).unwrap_or(schema),
                        _ => schema,
                    };
                    out.insert(k, self.to_json(v, field_schema)?);
                }
                Value::Object(out)
            }
            Avro::Decimal(d) => {
                let bytes: Vec<u8> = Vec::<u8>::try_from(&d).map_err(invalid)?;
                let scale = match schema {
                    Schema::Decimal(d) => d.scale,
                    _ => 0,
                };
                decimal(&bytes, scale)?
            }
            Avro::BigDecimal(b) => number_or_text(b.to_string()),
            Avro::Date(days) => {
                let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
                    .and_then(|e| e.checked_add_signed(chrono::TimeDelta::days(i64::from(days))))
                    .ok_or_else(|| invalid(format!("date {days} days from 1970 is out of range")))?;
                Value::String(date.format("%Y-%m-%d").to_string())
            }
            Avro::TimeMillis(ms) => time_of_day(i64::from(ms) * 1_000_000)?,
            Avro::TimeMicros(us) => time_of_day(us.saturating_mul(1_000))?,
            Avro::TimestampMillis(ms) => timestamp(i128::from(ms) * 1_000_000, true)?,
            Avro::TimestampMicros(us) => timestamp(i128::from(us) * 1_000, true)?,
            Avro::TimestampNanos(ns) => timestamp(i128::from(ns), true)?,
            Avro::LocalTimestampMillis(ms) => timestamp(i128::from(ms) * 1_000_000, false)?,
            Avro::LocalTimestampMicros(us) => timestamp(i128::from(us) * 1_000, false)?,
            Avro::LocalTimestampNanos(ns) => timestamp(i128::from(ns), false)?,
            Avro::Duration(d) => serde_json::json!({
                "months": u32::from(d.months()),
                "days": u32::from(d.days()),
                "millis": u32::from(d.millis()),
            }),
        })
    }
}

fn float(f: f64) -> Result<Value> {
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| invalid(format!("{f} cannot be stored (JSON has no NaN or infinity)")))
}

/// A decimal's two's-complement big-endian unscaled value with `scale` digits after the point.
fn decimal(bytes: &[u8], scale: usize) -> Result<Value> {
    if bytes.len() > 16 {
        return Err(invalid(format!("decimal of {} bytes (at most 16 are read)", bytes.len())));
    }
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut buf = if negative { [0xFFu8; 16] } else { [0u8; 16] };
    buf[16 - bytes.len()..].copy_from_slice(bytes);
    let unscaled = i128::from_be_bytes(buf);
    let digits = unscaled.unsigned_abs().to_string();
    let text = if scale == 0 {
        digits
    } else if digits.len() > scale {
        format!("{}.{}", &digits[..digits.len() - scale], &digits[digits.len() - scale..])
    } else {
        format!("0.{}{}", "0".repeat(scale - digits.len()), digits)
    };
    Ok(number_or_text(if unscaled < 0 { format!("-{text}") } else { text }))
}

/// Decimal text as a JSON number when a float holds it exactly enough (15 significant
/// digits), else as text.
fn number_or_text(text: String) -> Value {
    let significant = text.chars().filter(char::is_ascii_digit).collect::<String>();
    let significant = significant.trim_start_matches('0');
    if significant.len() <= 15
        && let Ok(f) = text.parse::<f64>()
        && let Some(n) = Number::from_f64(f)
    {
        // Integral values stay integers.
        if !text.contains('.')
            && let Ok(i) = text.parse::<i64>()
        {
            return Value::from(i);
        }
        return Value::Number(n);
    }
    Value::String(text)
}

fn time_of_day(nanos: i64) -> Result<Value> {
    let secs = u32::try_from(nanos.div_euclid(1_000_000_000)).map_err(|_| invalid("time of day out of range"))?;
    let sub = u32::try_from(nanos.rem_euclid(1_000_000_000)).map_err(|_| invalid("time of day out of range"))?;
    let t = chrono::NaiveTime::from_num_seconds_from_midnight_opt(secs, sub)
        .ok_or_else(|| invalid(format!("time of day {nanos} ns out of range")))?;
    Ok(Value::String(t.format("%H:%M:%S%.6f").to_string()))
}

fn timestamp(nanos: i128, utc: bool) -> Result<Value> {
    let secs = i64::try_from(nanos.div_euclid(1_000_000_000)).map_err(|_| invalid("timestamp out of range"))?;
    let sub = u32::try_from(nanos.rem_euclid(1_000_000_000)).map_err(|_| invalid("timestamp out of range"))?;
    let t = chrono::DateTime::from_timestamp(secs, sub).ok_or_else(|| invalid("timestamp out of range"))?;
    Ok(Value::String(if utc {
        t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    } else {
        t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::to_avro_datum;
    use serde_json::json;

    const SCHEMA: &str = r#"{
        "type": "record", "name": "Click", "namespace": "t",
        "fields": [
            {"name": "_id", "type": "string"},
            {"name": "user", "type": "long"},
            {"name": "price", "type": ["null", "double"]},
            {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["click", "view"]}},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "attrs", "type": {"type": "map", "values": "int"}},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}},
            {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
            {"name": "raw", "type": "bytes"},
            {"name": "next", "type": ["null", "Kind"]}
        ]}"#;

    fn datum(price: Option<f64>) -> Vec<u8> {
        let schema = Schema::parse_str(SCHEMA).unwrap();
        let mut r = apache_avro::types::Record::new(&schema).unwrap();
        r.put("_id", "c1");
        r.put("user", 42i64);
        r.put(
            "price",
            match price {
                Some(p) => Avro::Union(1, Box::new(Avro::Double(p))),
                None => Avro::Union(0, Box::new(Avro::Null)),
            },
        );
        r.put("kind", Avro::Enum(1, "view".into()));
        r.put("tags", Avro::Array(vec![Avro::String("a".into()), Avro::String("b".into())]));
        r.put("attrs", Avro::Map([("n".to_string(), Avro::Int(3))].into_iter().collect()));
        r.put("at", Avro::TimestampMillis(1_795_000_000_123));
        r.put("day", Avro::Date(19_000));
        r.put("amount", Avro::Decimal(apache_avro::Decimal::from(vec![0xFF, 0x85])));
        r.put("raw", Avro::Bytes(vec![1, 2, 3]));
        r.put("next", Avro::Union(1, Box::new(Avro::Enum(0, "click".into()))));
        to_avro_datum(&schema, r).unwrap()
    }

    #[test]
    fn decodes_every_kind_of_field_in_each_framing() {
        let body = datum(Some(9.5));
        let expected = json!({
            "_id": "c1", "user": 42, "price": 9.5, "kind": "view", "tags": ["a", "b"], "attrs": {"n": 3},
            "at": "2026-11-18T11:06:40.123000Z", "day": "2022-01-08", "amount": -1.23, "raw": "AQID",
            "next": "click"
        });
        let bare = AvroDecoder::new(SCHEMA, AvroFraming::Bare, None).unwrap();
        assert_eq!(Value::Object(bare.decode(&body).unwrap()), expected);

        let confluent = AvroDecoder::new(SCHEMA, AvroFraming::Confluent, Some(7)).unwrap();
        let framed = [&[0u8, 0, 0, 0, 7][..], &body].concat();
        assert_eq!(Value::Object(confluent.decode(&framed).unwrap()), expected);
        let other_id = [&[0u8, 0, 0, 0, 8][..], &body].concat();
        assert!(confluent.decode(&other_id).unwrap_err().message.contains("schema id 8"));
        assert!(confluent.decode(&body).is_err(), "a bare datum is not Confluent-framed");

        let single = AvroDecoder::new(SCHEMA, AvroFraming::SingleObject, None).unwrap();
        let schema = Schema::parse_str(SCHEMA).unwrap();
        let header = RabinFingerprintHeader::from_schema(&schema).build_header();
        let framed = [&header[..], &body].concat();
        assert_eq!(Value::Object(single.decode(&framed).unwrap()), expected);
        let wrong = [&[0xC3u8, 0x01][..], &[0u8; 8], &body].concat();
        assert!(single.decode(&wrong).unwrap_err().message.contains("fingerprint"));
        // The fingerprint is little-endian: the same bytes reversed are another fingerprint.
        let mut swapped = header.clone();
        swapped[2..].reverse();
        let swapped = [&swapped[..], &body].concat();
        assert!(single.decode(&swapped).unwrap_err().message.contains("fingerprint"));
    }

    #[test]
    fn bad_messages_are_errors_not_documents() {
        let dec = AvroDecoder::new(SCHEMA, AvroFraming::Bare, None).unwrap();
        let body = datum(None);
        assert_eq!(dec.decode(&body).unwrap().get("price"), Some(&Value::Null));
        let trailing = [&body[..], &[1u8, 2]].concat();
        assert!(dec.decode(&trailing).unwrap_err().message.contains("2 bytes after"));
        assert!(dec.decode(&body[..body.len() / 2]).is_err(), "truncated datum");
        assert!(dec.decode(b"").is_err());
        assert!(dec.decode(&datum(Some(f64::NAN))).unwrap_err().message.contains("NaN"));
    }

    #[test]
    fn schemas_must_be_valid_records() {
        let bad = |s: &str| AvroDecoder::new(s, AvroFraming::Bare, None).err().unwrap().message;
        assert!(bad("{").contains("avro schema"));
        assert!(bad(r#""string""#).contains("must be a record"));
        assert!(AvroDecoder::new(SCHEMA, AvroFraming::Bare, None).is_ok());
    }

    #[test]
    fn decimals_keep_their_digits() {
        assert_eq!(decimal(&[0x30, 0x39], 2).unwrap(), json!(123.45));
        assert_eq!(decimal(&[0x05], 3).unwrap(), json!(0.005));
        assert_eq!(decimal(&[0x30, 0x39], 0).unwrap(), json!(12345));
        // 20 significant digits do not fit a float: exact text.
        let big = 12_345_678_901_234_567_890i128.to_be_bytes();
        assert_eq!(decimal(&big, 4).unwrap(), json!("1234567890123456.7890"));
        assert!(decimal(&[0u8; 17], 0).is_err());
    }
}
