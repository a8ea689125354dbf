"""The wavespeed dialect: `schemas` (wire models), `serving` (translation and rendering), `router` (endpoints)."""
