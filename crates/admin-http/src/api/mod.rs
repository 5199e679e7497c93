//! The `/api` routes, one module per resource. Each handler carries its OpenAPI description.

mod cluster;
mod connections;
mod exchanges;
mod fields;
mod groups;
mod limits;
mod messages;
mod overview;
mod queues;
mod topics;
mod users;

use std::sync::Arc;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AdminState;

pub fn routes() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new()
        .routes(routes!(overview::overview))
        .routes(routes!(overview::history))
        .routes(routes!(cluster::status))
        .routes(routes!(cluster::remove_node))
        .routes(routes!(cluster::add_node))
        .routes(routes!(topics::list, topics::create))
        .routes(routes!(topics::describe, topics::delete))
        .routes(routes!(topics::alter_config))
        .routes(routes!(topics::add_partitions))
        .routes(routes!(topics::checksum))
        .routes(routes!(topics::reassign))
        .routes(routes!(messages::publish, messages::peek))
        .routes(routes!(groups::list))
        .routes(routes!(groups::describe, groups::delete))
        .routes(routes!(groups::reset_offsets))
        .routes(routes!(connections::list))
        .routes(routes!(connections::close))
        .routes(routes!(connections::channels))
        .routes(routes!(queues::list_vhosts))
        .routes(routes!(queues::put_vhost, queues::delete_vhost))
        .routes(routes!(queues::list_all))
        .routes(routes!(queues::list_in_vhost))
        .routes(routes!(queues::describe, queues::declare, queues::delete))
        .routes(routes!(queues::purge))
        .routes(routes!(queues::get_messages))
        .routes(routes!(exchanges::list_all))
        .routes(routes!(exchanges::list_in_vhost))
        .routes(routes!(
            exchanges::describe,
            exchanges::declare,
            exchanges::delete
        ))
        .routes(routes!(exchanges::publish))
        .routes(routes!(exchanges::list_bindings))
        .routes(routes!(
            exchanges::list_bindings_in_vhost,
            exchanges::bind,
            exchanges::unbind
        ))
        .routes(routes!(users::list))
        .routes(routes!(users::describe, users::put, users::delete))
        .routes(routes!(users::list_permissions))
        .routes(routes!(users::put_permission, users::delete_permission))
        .routes(routes!(limits::list_vhost_limits))
        .routes(routes!(limits::vhost_limits))
        .routes(routes!(limits::put_vhost_limit, limits::delete_vhost_limit))
        .routes(routes!(limits::list_user_limits))
        .routes(routes!(limits::user_limits))
        .routes(routes!(limits::put_user_limit, limits::delete_user_limit))
}
