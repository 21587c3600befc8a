"""One FastAPI router per resource: jobs, datasets, models, precomputes, inspect, health."""
