//! Publishing and publish jobs (docs/api.md 4.4 and decisions 4 and 5).

use super::{App, HandlerResult, require, uuid_param};
use crate::http::{Request, Response, problem};
use crate::store::auth::ACTION_CONTENT_WRITE;

fn enqueue(app: &App, id: uuid::Uuid) -> Result<(), Response> {
    // The queue is bounded; a full queue is reported rather than blocking the request. The job
    // is durable and the restart scan or a retry would pick it up.
    app.jobs.try_send(id).map_err(|_| {
        problem(
            500,
            "publish queue is full; the job is queued durably and will run after restart",
        )
    })
}

pub fn publish(app: &App, req: &mut Request, name: &str, version: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let (job, created) = app.store.publish(name, version)?;
    if created {
        enqueue(app, job.id)?;
        Ok(Response::json(202, &job))
    } else {
        Ok(Response::json(200, &job))
    }
}

pub fn get_job(app: &App, req: &mut Request, id: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let id = uuid_param(id, "publish job id")?;
    Ok(Response::json(200, &app.store.job(id)?))
}

pub fn retry(app: &App, req: &mut Request, id: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let id = uuid_param(id, "publish job id")?;
    let job = app.store.retry_job(id)?;
    enqueue(app, job.id)?;
    Ok(Response::json(202, &job))
}
