-- The job store's schema before versioning (vace-local at 7706c50), as its create_all emitted it on sqlite.
-- Kept verbatim so the upgrade test opens a store exactly as deployed databases have it.

CREATE TABLE job_logs (
	id INTEGER NOT NULL,
	job_id VARCHAR(64) NOT NULL,
	ts FLOAT NOT NULL,
	level VARCHAR(8) NOT NULL,
	source VARCHAR(16) NOT NULL,
	message TEXT NOT NULL,
	PRIMARY KEY (id)
);

CREATE INDEX ix_job_logs_job_id ON job_logs (job_id);

CREATE TABLE jobs (
	id VARCHAR(64) NOT NULL,
	dialect VARCHAR(32) NOT NULL,
	model VARCHAR(255) NOT NULL,
	spec JSON NOT NULL,
	extra JSON NOT NULL,
	status VARCHAR(16) NOT NULL,
	priority INTEGER NOT NULL,
	stage VARCHAR(16),
	step INTEGER NOT NULL,
	total INTEGER NOT NULL,
	progress FLOAT NOT NULL,
	outputs JSON NOT NULL,
	result JSON,
	error TEXT,
	error_type VARCHAR(64),
	timings JSON NOT NULL,
	created_at FLOAT NOT NULL,
	started_at FLOAT,
	finished_at FLOAT,
	updated_at FLOAT NOT NULL,
	attempts INTEGER NOT NULL,
	worker_id VARCHAR(64),
	heartbeat_at FLOAT,
	cancel_requested BOOLEAN NOT NULL,
	webhook_url TEXT,
	webhook_status VARCHAR(16),
	webhook_attempts INTEGER NOT NULL,
	webhook_next_at FLOAT,
	PRIMARY KEY (id)
);

CREATE INDEX ix_jobs_finished ON jobs (finished_at);

CREATE INDEX ix_jobs_queue ON jobs (status, priority, created_at);

CREATE INDEX ix_jobs_webhook ON jobs (webhook_status, webhook_next_at);

CREATE TABLE stage_stats (
	slot INTEGER NOT NULL,
	stage VARCHAR(16) NOT NULL,
	count INTEGER NOT NULL,
	total FLOAT NOT NULL,
	buckets JSON NOT NULL,
	PRIMARY KEY (slot, stage)
);

CREATE TABLE uploads (
	id VARCHAR(64) NOT NULL,
	token VARCHAR(64) NOT NULL,
	filename VARCHAR(255) NOT NULL,
	content_type VARCHAR(128),
	size BIGINT,
	path TEXT NOT NULL,
	created_at FLOAT NOT NULL,
	completed_at FLOAT,
	PRIMARY KEY (id)
);

CREATE INDEX ix_uploads_created_at ON uploads (created_at);

CREATE TABLE workers (
	id VARCHAR(64) NOT NULL,
	slot INTEGER NOT NULL,
	instance VARCHAR(64) NOT NULL,
	pid INTEGER,
	device VARCHAR(32) NOT NULL,
	status VARCHAR(16) NOT NULL,
	model VARCHAR(255),
	message TEXT,
	info JSON NOT NULL,
	current_job VARCHAR(64),
	started_at FLOAT NOT NULL,
	heartbeat_at FLOAT,
	PRIMARY KEY (id)
);

CREATE INDEX ix_workers_instance ON workers (instance);
