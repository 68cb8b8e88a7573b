//! Typed access to a command's `arguments` with QEMU's QAPI input-visitor error texts.

use super::QmpError;
use serde_json::{Map, Value};

/// Reads members of an `arguments` object; [`Args::finish`] rejects members nobody read, as the
/// QAPI visitor does after visiting the schema's members.
pub struct Args<'a> {
    map: &'a Map<String, Value>,
    used: Vec<&'a str>,
}

impl<'a> Args<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Self { map, used: Vec::new() }
    }

    fn get(&mut self, name: &str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(name)?;
        self.used.push(k.as_str());
        Some(v)
    }

    fn required<T>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Self, &str) -> Result<Option<T>, QmpError>,
    ) -> Result<T, QmpError> {
        f(self, name)?.ok_or_else(|| QmpError::missing_parameter(name))
    }

    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(QmpError::invalid_parameter_type(name, "boolean")),
        }
    }

    pub fn bool(&mut self, name: &str) -> Result<bool, QmpError> {
        self.required(name, Self::opt_bool)
    }

    pub fn opt_str(&mut self, name: &str) -> Result<Option<&'a str>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(QmpError::invalid_parameter_type(name, "string")),
        }
    }

    pub fn str(&mut self, name: &str) -> Result<&'a str, QmpError> {
        self.required(name, Self::opt_str)
    }

    /// QAPI `int`: a JSON integer within i64.
    pub fn opt_int(&mut self, name: &str) -> Result<Option<i64>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                n.as_i64().map(Some).ok_or_else(|| QmpError::invalid_parameter_type(name, "integer"))
            }
            Some(_) => Err(QmpError::invalid_parameter_type(name, "integer")),
        }
    }

    pub fn int(&mut self, name: &str) -> Result<i64, QmpError> {
        self.required(name, Self::opt_int)
    }

    /// QAPI `uint64`: a non-negative JSON integer.
    pub fn opt_uint(&mut self, name: &str) -> Result<Option<u64>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                n.as_u64().map(Some).ok_or_else(|| QmpError::invalid_parameter_type(name, "integer"))
            }
            Some(_) => Err(QmpError::invalid_parameter_type(name, "integer")),
        }
    }

    pub fn opt_array(&mut self, name: &str) -> Result<Option<&'a Vec<Value>>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(QmpError::invalid_parameter_type(name, "array")),
        }
    }

    pub fn opt_object(&mut self, name: &str) -> Result<Option<&'a Map<String, Value>>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(_) => Err(QmpError::invalid_parameter_type(name, "object")),
        }
    }

    /// Members not read so far (for commands with open-ended properties, like `device_add`).
    pub fn unread(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.map.keys().map(String::as_str).filter(|k| !self.used.contains(k))
    }

    /// Fails on the first member that was not read.
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().find(|k| !self.used.contains(&k.as_str())) {
            Some(k) => Err(QmpError::unexpected_parameter(k)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn qemu_error_texts() {
        let m = map(json!({"enable": "yes", "n": 1.5, "u": -1, "x": 1}));
        let mut a = Args::new(&m);
        assert_eq!(
            a.bool("enable").unwrap_err().desc,
            "Invalid parameter type for 'enable', expected: boolean"
        );
        assert_eq!(a.int("n").unwrap_err().desc, "Invalid parameter type for 'n', expected: integer");
        assert_eq!(a.opt_uint("u").unwrap_err().desc, "Invalid parameter type for 'u', expected: integer");
        assert_eq!(a.str("missing").unwrap_err().desc, "Parameter 'missing' is missing");
        assert_eq!(a.finish().unwrap_err().desc, "Parameter 'x' is unexpected");

        let m = map(json!({"enable": true, "name": "a", "v": 7}));
        let mut a = Args::new(&m);
        assert!(a.bool("enable").unwrap());
        assert_eq!(a.str("name").unwrap(), "a");
        assert_eq!(a.opt_int("v").unwrap(), Some(7));
        assert_eq!(a.opt_array("none").unwrap(), None);
        a.finish().unwrap();
    }
}
