//! The `/api` routes, one module per resource. Each handler carries its OpenAPI description.

mod connections;
mod groups;
mod messages;
mod overview;
mod topics;

use std::sync::Arc;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AdminState;

pub fn routes() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new()
        .routes(routes!(overview::overview))
        .routes(routes!(overview::history))
        .routes(routes!(topics::list, topics::create))
        .routes(routes!(topics::describe, topics::delete))
        .routes(routes!(topics::alter_config))
        .routes(routes!(topics::add_partitions))
        .routes(routes!(messages::publish, messages::peek))
        .routes(routes!(groups::list))
        .routes(routes!(groups::describe, groups::delete))
        .routes(routes!(groups::reset_offsets))
        .routes(routes!(connections::list))
        .routes(routes!(connections::close))
}
