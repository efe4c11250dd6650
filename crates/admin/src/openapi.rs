//! The OpenAPI document of the admin API, generated from the handlers and their
//! types (utoipa), so it cannot drift from the code.

use utoipa::OpenApi;

use crate::error::ErrorBody;
use crate::integration::{DisconnectResponse, IntegrationView, SenderView};
use crate::sender::{SenderRequest, TestError, TestOutcome, TestStatus};

#[derive(OpenApi)]
#[openapi(
    info(title = "mail-dispatch admin API", description = "Connect an organization's Microsoft 365 or Google Workspace account, save and test its sender, disconnect it."),
    paths(crate::connect::authorize, crate::connect::callback, crate::connect::confirm, crate::sender::put_sender, crate::integration::get_integration, crate::integration::delete_integration, crate::portal::create_portal_session),
    components(schemas(crate::connect::AuthorizeRequest, crate::connect::AuthorizeResponse, crate::connect::ConfirmRequest, crate::connect::ConfirmResponse, crate::connect::ConfirmStatus, SenderRequest, TestOutcome, TestStatus, IntegrationView, SenderView, crate::integration::SendingPause, ErrorBody, crate::error::ErrorDetail, crate::error::ApiErrorCode, DisconnectResponse, TestError, crate::portal::PortalSessionRequest, crate::portal::PortalSessionResponse, crate::recipients::RecipientsSee, crate::recipients::RewriteReason)),
    modifiers(&BearerAuth),
    tags((name = "integration", description = "An organization's mail provider"),
         (name = "portal", description = "The hosted settings page: single-use links for an organization's admin"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
