//! Vulcan guest SDK.
