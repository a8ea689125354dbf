"""The fal dialect: `schemas` (the wire contract: request models and constants), `serving` (requests →
`JobSpec`, submit), `render` (job and errors → responses), `router` (the endpoints, thin)."""
