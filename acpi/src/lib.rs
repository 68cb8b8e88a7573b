//! ACPI table assembly (filled in by its owner).
