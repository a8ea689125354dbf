"""The openai dialect: `schemas` (wire models), `serving` (translation and rendering), `router` (endpoints)."""
