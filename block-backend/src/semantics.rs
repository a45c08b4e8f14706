//! Front-end request semantics (being written).
